"""Routing: prompt -> adapter, training-free.

- `router`      AriadneRouter (centroid buffers, scoring through the kernel dispatcher, decisions), RoutingDecision
- `embedding`   prompt sources and batched pooled embedding
- `centroids`   k-means per adapter; build_router_tables (center, whitening, centroids)
- `whitening`   within-adapter whitening (Ledoit-Wolf shrinkage)
- `inputs`      token-id / mask checks, special-token pooling weights
- `ood`         out-of-distribution score
- `calibration` cross-fitted calibration of the ood score
- `signal`      the routing signal (input embedding, or the base hidden state after layer k)
- `route`       the one routing path (ids -> decision) and the router built from a bundle's tensors
- `report`      selection accuracy and confusion of routed prompts

Import from the submodules; this package imports nothing so that any of them loads on its own.
"""
