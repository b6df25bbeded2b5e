"""The run directory, the interface between stages: its paths, done records and locks (`directory`), work
units and shards with their seeds (`units`), and the JSONL files they are written to (`jsonl`)."""
