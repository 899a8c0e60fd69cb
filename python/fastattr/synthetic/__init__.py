"""Small random-weight circuit-tracer ``ReplacementModel``\\ s, built fully offline.

Scaffolding for the demo, the tests and the benchmarks, not part of fastattr's runtime: nothing
in fastattr imports it except ``fastattr.demo``. It needs circuit-tracer and transformers.

Tests, benchmarks and the demo need a real ``circuit_tracer.ReplacementModel`` (so that the real
``circuit_tracer.attribute`` runs end to end), but this project may not download anything from
the Hugging Face hub. So everything is built locally, deterministically given ``seed``:

* ``tokenizer``: a word-level tokenizer over a fixed English word list (:func:`build_tokenizer`),
  saved as a ``transformers`` tokenizer folder that ``AutoTokenizer.from_pretrained`` loads
  offline, and random prompts in its vocabulary (:func:`random_prompt`);
* ``transcoders``: random per-layer (``TranscoderSet`` of ``SingleLayerTranscoder``) or
  cross-layer (``CrossLayerTranscoder``) transcoders, calibrated on the model's own activations;
* ``models``: a tiny random transformer for either circuit-tracer backend (TransformerLens
  ``HookedTransformer`` or an nnsight-wrapped HF ``LlamaForCausalLM``) with those transcoders
  (:func:`make_replacement_model`).
"""

from .models import make_replacement_model
from .tokenizer import build_tokenizer, default_tokenizer_dir, random_prompt, tokenizer_words

__all__ = [
    "build_tokenizer",
    "default_tokenizer_dir",
    "make_replacement_model",
    "random_prompt",
    "tokenizer_words",
]
