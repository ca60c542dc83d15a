"""The data side: image reading, annotation datasets, tar shards, transforms, the tokenizer, typed batches, samplers."""
