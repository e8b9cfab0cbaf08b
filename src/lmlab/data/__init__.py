"""Data: corpus readers, the memory-mapped token store, pre-training objectives."""
