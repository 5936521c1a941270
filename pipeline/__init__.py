"""memtrain: train memory-augmented decoders (RMT, ARMT) on long books with DeepSpeed."""

__version__ = "0.1.0"
