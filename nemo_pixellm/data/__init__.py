"""Data: the synthetic vision-language set, the tokenizer, shard-backed datasets and the Bridge dataset provider."""
