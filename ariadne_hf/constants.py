"""Names shared across the package: bundle file names, sentinel adapter names, environment variables.

How the bundle file names fit together (which files a bundle holds and requires, what counts as a pickle, the
validator) is `ariadne_hf.bundle.layout`.
"""

BASE_ADAPTER = "__base__"
"""Adapter name of rows routed to the plain backbone (PEFT's own sentinel for mixed batches)."""

BUNDLE_FORMAT_VERSION = "1.3"
"""Major.minor of the bundle layout. A bundle with a newer major version is refused. 1.2 added the
out-of-distribution tables (router.token_counts, router.ood_stats); 1.0/1.1 bundles load unchanged (no ood score).
1.3 stores the token counts sparse (router.token_count_keys / router.token_count_values) and adds routing_layer to
config.json (absent = 0); 1.2 bundles (dense router.token_counts) load unchanged."""

CONFIG_NAME = "config.json"
ROUTER_WEIGHTS_NAME = "model.safetensors"
GENERATION_CONFIG_NAME = "generation_config.json"
ADAPTERS_DIR = "adapters"
BASE_DIR = "base"
MODEL_CARD_NAME = "README.md"
IMAGES_DIR = "images"
REPO_ID_PLACEHOLDER = "your-org/your-ariadne-bundle"
"""Repo id in the card's usage snippet until `hub.push_bundle` replaces it by the real one."""
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_WEIGHT_NAMES = ("adapter_model.bin", "pytorch_model.bin", "model.pt", "model.bin")
"""Names transformers, PEFT and torch give weights saved as pickles where a bundle has safetensors (the pickle
rules that use them: bundle/layout.py)."""

ENV_KERNEL = "ARIADNE_KERNEL"
"""Overrides the routing kernel backend: "torch" or "triton"."""

# Keys of the router state in model.safetensors.
ROUTER_CENTROIDS = "router.centroids"  # [K, D] fp32
ROUTER_CENTROID_ADAPTER = "router.centroid_adapter"  # [K] int64
ROUTER_CENTER = "router.center"  # [D] fp32, optional
ROUTER_TOKEN_WEIGHTS = "router.token_weights"  # [V] fp32, optional
ROUTER_TRANSFORM = "router.transform"  # [D, D] fp32, optional (whitening W)
ROUTER_TOKEN_COUNTS = "router.token_counts"  # [A, V] int64, read only (bundles 1.2: dense token counts)
ROUTER_TOKEN_KEYS = "router.token_count_keys"  # [nnz] int64 sorted adapter * V + token, optional (ood, sparse)
ROUTER_TOKEN_VALUES = "router.token_count_values"  # [nnz] int64 > 0, with ROUTER_TOKEN_KEYS (occurrences)
TOKEN_ROUTER_PREFIX = "token_router."
"""Prefix of the token-routing router's tensors (its own centroid table in the input-embedding space, stored when
routing_layer > 0: token routing re-routes on the input embedding while decoding), e.g. token_router.router.centroids."""
ROUTER_OOD_STATS = "router.ood_stats"  # [2, C] fp32 (routing.ood.OOD_STATS_SHAPE), optional: z-score mean, sd

UNSET: object = object()
"""A call argument left out (use the config's value); distinct from None, which means "none" for
`reject_threshold` and `reject`."""
