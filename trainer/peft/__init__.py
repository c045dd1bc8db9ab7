"""Parameter-efficient fine-tuning: any method of the installed peft library, and finetrain's
own bottleneck adapters."""
