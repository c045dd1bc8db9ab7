"""Per-device memory before launch (`finetrain estimate`): the model's shapes and activations
measured on the meta device, and each strategy's accounting of them."""
