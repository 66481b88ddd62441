"""Layer 1, shared parts: what several pipeline steps use (imports only ``vpr.foundations``).

The network and its heads, reading the shards, retrieval and Recall@N, checkpoints, the one extraction
path, the descriptor store, release versions and the release as served, splits, triplets, the training
history, the frozen-trunk cache and data-parallel ranks.
"""
