"""`evaluate` metric module for identity-level text-to-image retrieval (DiaNA).

Load it from its folder (offline): `evaluate.load("path/to/training/retrieval_metric")`.
The numbers come from `diana.training.evaluation.metrics.retrieval_metrics`, so the module needs the
`diana-chatpr` package installed. (`evaluate` parses this file's imports line by line: one import
per line.)
"""

import datasets
import evaluate
import torch

from diana.training.evaluation.metrics import retrieval_metrics

_DESCRIPTION = """
Identity-level text-to-image retrieval metrics, as in IRRA / DiaNA (CVPR 2025). Each example is one
query: its row of scores over a gallery (higher is better) and the person id of the query. The
gallery's person ids are passed to `compute`. A gallery item is a positive for a query when it
shows the same person. Rankings sort scores in descending order and break ties by gallery index.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): one row per query, the query's score for every
        gallery item (all rows the same length G).
    references (`list` of `int`): the person id of every query.
    gallery_ids (`list` of `int`, passed to `compute`): the person id of every gallery item (G).
    ks (`list` of `int`, optional, default [1, 5, 10]): cut-offs of R@k.

Returns:
    `R@k` for each k, `mAP`, `mINP` (percent) and `mFR` (mean 0-based rank of the first correct
    gallery item).

Raises:
    ValueError: when a query's person has no item in the gallery (the error names the query).

Example:
    >>> metric = evaluate.load("training/retrieval_metric")
    >>> metric.compute(predictions=[[0.9, 0.1], [0.2, 0.4]], references=[7, 8], gallery_ids=[7, 8])
    {'R@1': 100.0, 'R@5': 100.0, 'R@10': 100.0, 'mAP': 100.0, 'mINP': 100.0, 'mFR': 0.0}
"""

_CITATION = """
@inproceedings{bai2025diana,
  title={Chat-based Person Retrieval via Dialogue-Refined Cross-Modal Alignment},
  author={Bai, Yang and Ji, Yucheng and Cao, Min and Wang, Jinqiao and Ye, Mang},
  booktitle={CVPR},
  year={2025}
}
@inproceedings{jiang2023irra,
  title={Cross-Modal Implicit Relation Reasoning and Aligning for Text-to-Image Person Retrieval},
  author={Jiang, Ding and Ye, Mang},
  booktitle={CVPR},
  year={2023}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RetrievalMetric(evaluate.Metric):
    """R@k, mAP, mINP and mFR for text-to-image person retrieval."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float64")),
                    "references": datasets.Value("int64"),
                }
            ),
            reference_urls=["https://github.com/anosorae/IRRA/blob/main/utils/metrics.py"],
        )

    def _compute(self, predictions, references, gallery_ids=None, ks=(1, 5, 10)):
        if gallery_ids is None:
            raise ValueError("pass gallery_ids (the person id of every gallery item) to compute()")
        lengths = {len(row) for row in predictions}
        if len(lengths) != 1:
            raise ValueError(f"every prediction row must score the whole gallery; got row lengths {sorted(lengths)}")
        similarity = torch.tensor(predictions, dtype=torch.float64)  # (Q, G), ranked in the scores' own precision
        return retrieval_metrics(
            similarity, torch.tensor(references), torch.tensor(list(gallery_ids)), ks=tuple(ks)
        )
