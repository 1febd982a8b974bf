"""The sharded training core: jitted step with exact accumulation, optimizer, checkpoints, metrics, SFT stage."""
