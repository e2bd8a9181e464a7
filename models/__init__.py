"""Pure ``nn.Module`` model code: encoders, connectors, decoders and the VLM that joins them.

Nothing under ``models/`` imports ``torch.distributed`` or ``deepspeed``; parallelism,
sharding and checkpointing are applied from ``ablate/`` to these plain modules.
"""
