"""Retrieval evaluation: the protocol (`protocol`), the split's encoding it runs on (`encoding`), its
metrics (`metrics`), the `diana evaluate` command (`evaluate_model`) and the attribute probe
(`attribute_probe`). The report it writes
(`eval_results.json`, curves, tables) is `diana.hub_cards.evaluation_report`, which the model card
reads too."""

from diana.hub_cards.evaluation_report import (
    CUMULATIVE_KEY,
    CURVES_FILE,
    RESULTS_FILE,
    flatten_results,
    format_round_table,
    reference_rounds,
    write_results,
)

from .encoding import TokenizedDialogues, build_gallery, encode_gallery, encode_queries, tokenize_dialogues
from .metrics import cumulative_hits_at_k, retrieval_metrics, retrieval_metrics_and_first_hit_ranks
from .protocol import evaluate_retrieval, score

__all__ = [
    "CUMULATIVE_KEY", "CURVES_FILE", "RESULTS_FILE", "TokenizedDialogues", "build_gallery", "cumulative_hits_at_k",
    "encode_gallery", "encode_queries", "evaluate_retrieval", "flatten_results", "format_round_table",
    "reference_rounds", "retrieval_metrics", "retrieval_metrics_and_first_hit_ranks", "score", "tokenize_dialogues",
    "write_results",
]
