"""Chat-based search over a user's own gallery.

- `index`: `GalleryIndex`, the encoded gallery with its model's fingerprint (the one entry point);
- `storage`: its layouts on disk: a folder of memory-mapped shards + manifest, or one safetensors file;
- `topk`: exact top-k (ties by gallery index, as the evaluation protocol), also from a float16 scan
  with an exact float32 re-score, and the FAISS back end;
- `ann`: the approximate back end for millions of images (FAISS inverted file, exact re-score) and recall@k;
- `parallel_indexing`: indexing across `accelerate launch` processes (each encodes a share);
- `session`: `ChatSearchSession`, one witness's rounds, each encoding only its new tokens;
- `question_bank`: the questions a questioner may ask (JSON file, `diana build-question-bank`);
- `questioner`: the policies that pick the next question (`make_policy`);
- `contact_sheet`: the ranked photos of every round as one picture;
- `fingerprints`: what ties an index to a model and a processor;
- `cli`: `diana index` / `diana search` (`python -m diana.processing.search.cli`).

Everything but `cli` and `parallel_indexing` imports only torch, transformers, numpy, PIL, safetensors,
tqdm, matplotlib and `diana.processing`'s processor, image loader, command-line errors and SynthPedes'
templates (FAISS lazily, when the ANN is used), so the Space carries it as is.
"""

from .contact_sheet import save_contact_sheet
from .fingerprints import config_hash, model_fingerprint, processor_fingerprint, weights_checksum
from .index import AddReport, GalleryIndex, IndexMismatchError, list_images
from .question_bank import BankQuestion, QuestionBank
from .questioner import ProposedQuestion, Questioner, make_policy
from .session import ChatSearchSession, RoundResult
from .topk import FaissSearcher, exact_topk, faiss_available

__all__ = [
    "AddReport", "BankQuestion", "ChatSearchSession", "FaissSearcher", "GalleryIndex", "IndexMismatchError",
    "ProposedQuestion", "QuestionBank", "Questioner", "RoundResult", "config_hash", "exact_topk",
    "faiss_available", "list_images", "make_policy", "model_fingerprint", "processor_fingerprint", "save_contact_sheet", "weights_checksum",
]
