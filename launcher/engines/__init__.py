"""Engines: what the loop asks of one (engine.py) and each that does it: DDP or one process, FSDP2, DeepSpeed ZeRO;
the process group and Accelerator they run in."""
