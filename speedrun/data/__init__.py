"""The data layer: token shards (`shards`), the offline GPT-2 tokenizer (`tokenizer`), FineWeb
downloads (`fineweb`), text → shards (`encode`), the built-in corpus (`corpus`) and the distributed
train/val loaders (`loader`). Submodules are imported where used, so `speedrun data` starts without
loading torch."""
