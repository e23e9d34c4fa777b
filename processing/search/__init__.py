"""Chat-based search over a user's own gallery.

- `index`: `GalleryIndex`, the encoded gallery as one safetensors file with its model's fingerprint;
- `topk`: exact top-k (ties by gallery index, as the evaluation protocol) and the FAISS back end;
- `session`: `ChatSearchSession`, one witness's rounds, each encoding only its new tokens;
- `questioner`: the question bank and the policies that pick the next question (`make_policy`);
- `contact_sheet`: the ranked photos of every round as one picture;
- `fingerprints`: what ties an index to a model and a processor;
- `cli`: `diana index` / `diana search` (`python -m diana.processing.search.cli`).

Everything but `cli` imports only torch, transformers, numpy, PIL, safetensors, tqdm, matplotlib
and `diana.processing`'s processor, image loader, command-line errors and SynthPedes' templates, so
the Space carries it as is.
"""

from .contact_sheet import save_contact_sheet
from .fingerprints import config_hash, model_fingerprint, processor_fingerprint, weights_checksum
from .index import AddReport, GalleryIndex, IndexMismatchError, list_images
from .questioner import BankQuestion, ProposedQuestion, QuestionBank, Questioner, make_policy
from .session import ChatSearchSession, RoundResult
from .topk import FaissSearcher, exact_topk, faiss_available

__all__ = [
    "AddReport", "BankQuestion", "ChatSearchSession", "FaissSearcher", "GalleryIndex", "IndexMismatchError",
    "ProposedQuestion", "QuestionBank", "Questioner", "RoundResult", "config_hash", "exact_topk",
    "faiss_available", "list_images", "make_policy", "model_fingerprint", "processor_fingerprint", "save_contact_sheet", "weights_checksum",
]
