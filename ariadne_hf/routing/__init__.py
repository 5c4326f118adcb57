"""Routing: prompt -> adapter, training-free.

- `router`      AriadneRouter (centroid buffers, scoring through the kernel dispatcher, decisions), RoutingDecision
- `embedding`   prompt sources and batched pooled embedding
- `centroids`   k-means per adapter; build_router_tables (center, whitening, centroids)
- `whitening`   within-adapter whitening (Ledoit-Wolf shrinkage)
- `inputs`      token-id / mask checks, special-token pooling weights
- `ood`         out-of-distribution score
- `calibration` cross-fitted calibration of the ood score

Import from the submodules; this package imports nothing so that any of them loads on its own.
"""
