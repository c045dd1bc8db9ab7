"""Parallel strategies behind one interface (strategy.py): single, ddp, fsdp (torch_strategy.py,
single.py, ddp.py, fsdp.py) and DeepSpeed ZeRO 1-3 (zero.py); the registry that resolves and
checks them (registry.py); the per-layer options every strategy applies (layer_options.py);
and DCP checkpoint files (dcp.py)."""
