"""Books -> cleaned text -> tokenizer -> multi-segment sample shards (Arrow + manifest.json)."""
