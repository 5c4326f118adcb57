"""Routing quality of one set of routed prompts: selection accuracy (macro, micro, per adapter) and the confusion
matrix. Pure (names in, numbers out): the model's `evaluate_heldout`, the evaluation runs and the demo share it."""

from __future__ import annotations

from ..constants import BASE_ADAPTER


def routing_report(true_labels: list[str], predicted: list[str], adapter_order: list[str]) -> dict:
    """Selection accuracy of routed adapter names against the true adapters.

    Returns {"labels", "predicted_labels", "confusion" (rows true in `adapter_order`, columns predicted in
    adapter_order + ["__base__"]), "accuracy" {name: float}, "macro_accuracy", "micro_accuracy",
    "num_prompts" {name: int}}; adapters with no held-out prompt are left out of the macro mean.
    """
    if len(true_labels) != len(predicted):
        raise ValueError(f"{len(true_labels)} labels but {len(predicted)} predictions.")
    columns = list(adapter_order) + [BASE_ADAPTER]
    column_of = {name: i for i, name in enumerate(columns)}
    row_of = {name: i for i, name in enumerate(adapter_order)}
    confusion = [[0] * len(columns) for _ in adapter_order]
    for truth, guess in zip(true_labels, predicted, strict=True):
        confusion[row_of[truth]][column_of[guess]] += 1
    counts = {name: sum(confusion[i]) for i, name in enumerate(adapter_order)}
    accuracy = {name: confusion[i][i] / counts[name] for i, name in enumerate(adapter_order) if counts[name]}
    correct = sum(confusion[i][i] for i in range(len(adapter_order)))
    return {
        "labels": list(adapter_order),
        "predicted_labels": columns,
        "confusion": confusion,
        "accuracy": accuracy,
        "macro_accuracy": sum(accuracy.values()) / len(accuracy) if accuracy else 0.0,
        "micro_accuracy": correct / len(true_labels) if true_labels else 0.0,
        "num_prompts": {k: v for k, v in counts.items() if v},
    }
