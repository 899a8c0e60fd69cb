"""Small random-weight circuit-tracer ``ReplacementModel``\\ s, built fully offline.

Tests, benchmarks and the demo need a real ``circuit_tracer.ReplacementModel`` (so that the real
``circuit_tracer.attribute`` runs end to end), but this project may not download anything from
the Hugging Face hub. This module therefore builds everything locally:

* a word-level tokenizer over a fixed English word list (:func:`build_tokenizer`), saved as a
  ``transformers`` tokenizer folder that ``AutoTokenizer.from_pretrained`` loads offline;
* a tiny random transformer for either circuit-tracer backend (TransformerLens
  ``HookedTransformer`` or an nnsight-wrapped HF ``LlamaForCausalLM``);
* random per-layer (``TranscoderSet`` of ``SingleLayerTranscoder``) or cross-layer
  (``CrossLayerTranscoder``) transcoders, whose encoder biases / thresholds are calibrated on
  the model's own activations so that a chosen fraction of features fire per position, and
  whose decoders write at the scale of the real MLP outputs (so feature->feature and
  feature->logit influences are comparable to the error nodes, not negligible).

Everything is deterministic given ``seed``. Weights are drawn on the CPU in float32 and only
then cast / moved, so the same seed gives the same model on every device and dtype, up to
rounding. The network is one HF Llama for both backends (TransformerLens gets a copy of its
weights), so the same arguments give the same model, transcoders and graphs on either backend.

Requirements of circuit-tracer 0.5.0 that shape the code below (see the comments at each use):

* ``ensure_tokenized`` tokenizes with ``add_special_tokens=False`` and prepends a special token
  unless the first token is already special; it picks the first *truthy* id among
  ``bos/pad/eos/...``, so the BOS id must not be 0 (``filter(None, ...)`` drops id 0). Position
  0 is then zeroed out of the graph (``model.zero_positions == slice(0, 1)``; models whose name
  contains "gemma-3" and ends in "-it" zero 4 positions instead, so our names avoid that).
* The attribution targets use ``tokenizer.vocab_size`` as the graph's vocab size and decode
  logit indices with the tokenizer, so ``len(tokenizer) <= d_vocab`` is required (we make them
  equal by default).
* nnsight backend: ``NNSightReplacementModel.from_config`` loads the tokenizer from
  ``config._name_or_path`` and picks its hook mapping from ``config.architectures[0]``; for
  ``LlamaForCausalLM`` the transcoder hooks ``mlp.hook_in`` / ``mlp.hook_out`` map to
  ``post_attention_layernorm`` output / ``mlp`` output. The TransformerLens backend wraps every
  ``block.mlp`` in a ``ReplacementMLP`` with the same two hook names, so we use them for both.
* nnsight 0.6.1: ``model.transcoders`` on the nnsight model is an ``Envoy`` (the module is its
  ``._module``), and assigning it registered the transcoders as a submodule of the wrapped HF
  model (``model._model.transcoders``). ``from_config`` takes no device / dtype: it builds the
  HF model on the CPU at ``config.dtype``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import tempfile
from pathlib import Path
from typing import Literal

import torch

__all__ = [
    "build_tokenizer",
    "default_tokenizer_dir",
    "make_replacement_model",
    "random_prompt",
    "tokenizer_words",
]

# Bump when the tokenizer's vocabulary or pipeline changes, so stale caches are not reused.
_TOKENIZER_VERSION = 1

# Ids 0..3. BOS must not be id 0: circuit-tracer's ensure_tokenized picks the first truthy
# candidate id, so a BOS at 0 would be skipped in favour of the next special token.
_SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
_PAD, _BOS, _EOS, _UNK = _SPECIAL_TOKENS

# The pre-tokenizer isolates every punctuation character and every digit, so each of these is
# exactly one token wherever it appears.
_PUNCTUATION = list(".,!?;:'\"()[]-/&%$#@*+=<>_")
_DIGITS = list("0123456789")

# Common English words (lower case; the normalizer lowercases input), including those of the
# classic circuit-tracing demo prompts (capitals, states, opposites, ...). Contraction tails
# ("t", "s", "ll", ...) are included because "don't" splits into "don", "'", "t". Ids follow
# this order (duplicates dropped; a 512-token vocabulary holds the first 473 distinct words),
# so editing the list changes token ids: bump _TOKENIZER_VERSION when doing so.
_WORDS = """
the of and to a in is it that was for on are as with his they at be this from i have or by
one had not but what all were when we there can an your which their said if do will each
about how up out them then she many some so these would other into has more her two like him
see time could no make than first been its who now people my made over did down only way find
use may water long little very after words called just where most know get through back much
go good new write our me man too any day same right look think also around another came come
work three word must because does part even place well such here take why things help put
years different away again off went old number great tell men say small every found still
between name should home big give air line set own under read last never us left end along
while might next sound below saw something thought both few those always looked show large
often together asked house don world going want school important until form food keep
children feet land side without boy once animals life enough took sometimes four head above
kind began almost live page got earth need far hand high year mother light parts country
father let night following picture being study second eyes soon times story boys since white
days paper hard near sentence better best across during today others however sure means knew
try told young miles sun ways thing whole hear example heard several change answer room sea
against top turned learn point city play toward five using himself usually money seen car
morning given done open fact state capital containing france paris texas dallas austin
california london england spain madrid italy rome germany berlin japan tokyo china music
color red blue green black small large hot cold fast slow happy sad true false yes good bad
opposite big little up down inside outside before after first last early late cat dog bird
fish horse cow tree flower river mountain book table chair door window street road town king
queen game ball friend family brother sister baby girl woman women child number question
problem answer language english french spanish german word letter name sentence poem song t s
ll re ve d m not am is was be been being will would shall should can could may might must
eat drink sleep run walk talk speak sing dance jump swim fly drive ride read write draw paint
cook clean wash open close begin stop start finish win lose buy sell pay send bring carry hold
fall rise grow wait stay leave meet teach learn understand remember forget believe feel love
hate like want need hope wish plan try seem become happen appear allow hello hi please thank
thanks sorry person named lives lived says goes gave ate makes takes gets zero six seven eight
nine ten hundred thousand million week month monday sunday tomorrow yesterday north south east
west john mary alice bob sam therefore city cities town village farm forest ocean lake island
sky rain snow wind storm summer winter spring autumn morning evening
""".split()

# Punctuation that random_prompt() sprinkles between words so that prompts read like text.
_SENTENCE_END = [".", "?", "!"]
_CLAUSE_SEP = [","]


def _dedupe(items: list[str]) -> list[str]:
    seen: set[str] = set()
    return [w for w in items if not (w in seen or seen.add(w))]


def _pseudo_words() -> list[str]:
    """Pronounceable filler words (consonant-vowel syllables) for vocabularies larger than the
    word list. Deterministic and never colliding with the real words."""
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    real = set(_WORDS)
    out = []
    for c1 in consonants:
        for v1 in vowels:
            for c2 in consonants:
                for v2 in vowels:
                    w = c1 + v1 + c2 + v2
                    if w not in real:
                        out.append(w)
    return out  # 14*5*14*5 = 4900 candidates, minus any real words


def _vocabulary(vocab_size: int) -> list[str]:
    """The tokenizer's tokens in id order: specials, punctuation, digits, words, filler."""
    fixed = _SPECIAL_TOKENS + _PUNCTUATION + _DIGITS
    words = [w for w in _dedupe(_WORDS) if w not in fixed]
    min_size = len(fixed) + 1
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be at least {min_size}, got {vocab_size}")
    tokens = fixed + words
    if vocab_size > len(tokens):
        filler = _pseudo_words()
        need = vocab_size - len(tokens)
        if need > len(filler):
            raise ValueError(f"vocab_size must be at most {len(tokens) + len(filler)}")
        tokens += filler[:need]
    return tokens[:vocab_size]


def tokenizer_words(vocab_size: int = 512) -> list[str]:
    """The alphabetic words of the synthetic vocabulary of this size (each is one token)."""
    n_fixed = len(_SPECIAL_TOKENS) + len(_PUNCTUATION) + len(_DIGITS)
    return _vocabulary(vocab_size)[n_fixed:]


def default_tokenizer_dir(vocab_size: int = 512) -> str:
    """Cache folder for the synthetic tokenizer of the given size.

    ``$FASTATTR_CACHE/tokenizer-v{version}-{vocab_size}`` if ``FASTATTR_CACHE`` is set, otherwise
    under ``$XDG_CACHE_HOME/fastattr`` (default ``~/.cache/fastattr``). The version and size are
    part of the name so that different vocabularies never share (and clobber) a folder.
    """
    root = os.environ.get("FASTATTR_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "fastattr")
    return os.path.join(root, f"tokenizer-v{_TOKENIZER_VERSION}-{vocab_size}")


def _saved_vocab_size(path: Path) -> int | None:
    """Vocabulary size of the tokenizer saved in ``path``, or None if there is none."""
    tok_file = path / "tokenizer.json"
    if not (tok_file.is_file() and (path / "tokenizer_config.json").is_file()):
        return None
    try:
        data = json.loads(tok_file.read_text(encoding="utf-8"))
        vocab = dict(data["model"]["vocab"])
        vocab.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
        return len(vocab)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def build_tokenizer(path: str | os.PathLike, vocab_size: int = 512) -> str:
    """Build (or reuse) the synthetic word-level tokenizer in ``path`` and return the folder.

    The tokenizer lowercases its input (after NFKC), splits on whitespace, isolates every
    punctuation character and every digit, and maps each piece to a word id; anything outside
    the vocabulary becomes ``<unk>``, so arbitrary text tokenizes without errors. Each vocabulary
    word, punctuation character or digit is exactly one token. Special tokens: ``<pad>`` = 0,
    ``<bos>`` = 1, ``<eos>`` = 2, ``<unk>`` = 3 (``<unk>`` is not the wrapper's ``unk_token``,
    see the comment below). Encoding with ``add_special_tokens=True`` (the
    ``transformers`` default) prepends ``<bos>``, like the Llama / Gemma tokenizers.

    The result is a ``PreTrainedTokenizerFast`` saved with ``save_pretrained``; it loads back
    with ``AutoTokenizer.from_pretrained(path)`` with ``HF_HUB_OFFLINE=1``.

    If ``path`` already holds a tokenizer with ``vocab_size`` tokens it is reused as is; one of
    another size raises ``ValueError`` rather than being overwritten.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    existing = _saved_vocab_size(path)
    if existing == vocab_size:
        return str(path)
    if existing is not None:
        raise ValueError(
            f"{path} already holds a tokenizer with {existing} tokens, not {vocab_size}"
        )

    tokens = _vocabulary(vocab_size)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=_UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation("isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    # Marks the specials as added tokens: matched before normalization (so "<bos>" in text is
    # one token, not "<", "bos", ">") and dropped by decode(skip_special_tokens=True).
    tok.add_special_tokens(_SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{_BOS} $A",
        pair=f"{_BOS} $A {_EOS} $B",
        special_tokens=[(_BOS, vocab[_BOS]), (_EOS, vocab[_EOS])],
    )
    # No decoder: tokenizers then joins tokens with single spaces, which reads fine for words.

    # <unk> is deliberately *not* declared as the wrapper's unk_token: circuit-tracer's
    # ensure_tokenized prepends <bos> only when the first token is not in all_special_ids, so a
    # prompt starting with an unknown word would otherwise silently lose its <bos> (and its
    # first word would be zeroed out of the graph as if it were the BOS). Real Llama / Gemma
    # tokenizers never produce <unk> (byte fallback), so this matches their behaviour.
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=_BOS,
        eos_token=_EOS,
        pad_token=_PAD,
        padding_side="right",
    )

    # Save into a private sibling folder and move the files in with os.replace, tokenizer.json
    # last: concurrent builders (e.g. pytest-xdist workers) never see a half-written folder,
    # since _saved_vocab_size requires tokenizer.json.
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.tmp-") as tmp:
        hf_tok.save_pretrained(tmp)
        names = sorted(os.listdir(tmp), key=lambda n: n == "tokenizer.json")
        for name in names:
            os.replace(os.path.join(tmp, name), path / name)
    return str(path)


def random_prompt(n_tokens: int, seed: int, vocab_size: int = 512) -> str:
    """A random English-looking prompt of exactly ``n_tokens`` tokens.

    Exact for the tokenizer from :func:`build_tokenizer` with the same ``vocab_size``, counted
    without special tokens (``add_special_tokens=False``, as circuit-tracer tokenizes); circuit-
    tracer then prepends ``<bos>``, so the attributed sequence has ``n_tokens + 1`` positions.
    The prompt uses only vocabulary words and punctuation, never unknown words.
    """
    if n_tokens < 0:
        raise ValueError("n_tokens must be >= 0")
    rng = random.Random(seed)
    words = tokenizer_words(vocab_size)
    pieces: list[str] = []
    since_break = 0
    for i in range(n_tokens):
        # A punctuation mark after ~14 words on average (at least 6, never last) so prompts
        # resemble sentences; each mark is exactly one token, like each word.
        last = i == n_tokens - 1
        if since_break >= 6 and not last and rng.random() < 0.12:
            pieces.append(rng.choice(_SENTENCE_END if rng.random() < 0.6 else _CLAUSE_SEP))
            since_break = 0
        else:
            pieces.append(rng.choice(words))
            since_break += 1
    return " ".join(pieces)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

Backend = Literal["transformerlens", "nnsight"]
TranscoderKind = Literal["plt", "clt"]
Activation = Literal["relu", "jumprelu"]
Architecture = Literal["llama", "gpt2", "gemma2"]

# The transcoders read the MLP input and write the MLP output. Both backends know these names:
# TransformerLens via circuit-tracer's ReplacementMLP hook points, nnsight via its Llama mapping
# (post_attention_layernorm output -> mlp output).
_FEATURE_INPUT_HOOK = "mlp.hook_in"
_FEATURE_OUTPUT_HOOK = "mlp.hook_out"


def _default_density(d_transcoder: int) -> float:
    """~64 active features per layer and position (typical of real transcoders' L0), but at
    most 20% of the features, so tiny transcoders are not almost dense."""
    return min(0.2, 64.0 / d_transcoder)


def _llama_config(n_layers, d_model, n_heads, d_mlp, d_vocab, n_ctx, tokenizer_dir):
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=d_vocab,
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_heads,
        max_position_embeddings=n_ctx,
        hidden_act="silu",
        # 1/sqrt(d_model) keeps each projection roughly norm-preserving, so attention scores
        # are O(1) and patterns not uniform (HF's default 0.02 suits wide models only).
        initializer_range=1.0 / math.sqrt(d_model),
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        # circuit-tracer picks its nnsight hook mapping from architectures[0].
        architectures=["LlamaForCausalLM"],
        dtype=torch.float32,
    )
    # NNSightReplacementModel.from_config loads the tokenizer from config._name_or_path, and
    # the graph's cfg takes model_name / tokenizer_name from it too.
    cfg._name_or_path = tokenizer_dir
    # What NNSightReplacementModel.from_config sets anyway (its attention freeze hooks need the
    # eager attention's dropout call); using it for calibration too keeps the numerics alike.
    cfg._attn_implementation = "eager"
    return cfg


def _tl_config(llama_cfg, n_ctx: int, tokenizer_dir: str):
    """The TransformerLens config of the same Llama network (what TL's own Llama loader would
    derive from ``llama_cfg``)."""
    from transformer_lens import HookedTransformerConfig

    d_head = llama_cfg.hidden_size // llama_cfg.num_attention_heads
    return HookedTransformerConfig(
        n_layers=llama_cfg.num_hidden_layers,
        d_model=llama_cfg.hidden_size,
        n_ctx=n_ctx,
        d_head=d_head,
        n_heads=llama_cfg.num_attention_heads,
        d_mlp=llama_cfg.intermediate_size,
        d_vocab=llama_cfg.vocab_size,
        act_fn="silu",
        gated_mlp=True,
        normalization_type="RMS",
        final_rms=True,
        eps=llama_cfg.rms_norm_eps,
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        rotary_base=llama_cfg.rope_theta,
        rotary_adjacent_pairs=False,  # HF Llama rotates halves, not adjacent pairs
        original_architecture="LlamaForCausalLM",
        # circuit-tracer checks model_name for "gemma-3 ... -it" to zero 4 positions instead of 1.
        model_name="fastattr-synthetic-llama",
        # HookedTransformer.__init__ loads it with AutoTokenizer.from_pretrained (local: offline).
        tokenizer_name=tokenizer_dir,
        init_weights=False,  # the weights are copied from the HF model
        dtype=torch.float32,
        device="cpu",
        default_prepend_bos=True,
    )


def _llama_to_tl_state_dict(hf, tl_cfg) -> dict[str, torch.Tensor]:
    """HF Llama weights under HookedTransformer parameter names. Llama has no biases; TL's
    bias parameters are set to zero."""
    n, h = tl_cfg.n_heads, tl_cfg.d_head
    sd = {
        "embed.W_E": hf.model.embed_tokens.weight,
        "ln_final.w": hf.model.norm.weight,
        "unembed.W_U": hf.lm_head.weight.T,
        "unembed.b_U": torch.zeros(tl_cfg.d_vocab),
    }
    for i, layer in enumerate(hf.model.layers):
        att, mlp = layer.self_attn, layer.mlp
        p = f"blocks.{i}."
        # HF projections are (n_heads * d_head, d_model) linear weights; TL keeps per-head
        # (n_heads, d_model, d_head) input maps and (n_heads, d_head, d_model) output maps.
        for name, proj in (("W_Q", att.q_proj), ("W_K", att.k_proj), ("W_V", att.v_proj)):
            sd[p + "attn." + name] = proj.weight.reshape(n, h, -1).transpose(1, 2)
            sd[p + "attn.b_" + name[-1]] = torch.zeros(n, h)
        sd[p + "attn.W_O"] = att.o_proj.weight.T.reshape(n, h, -1)
        sd[p + "attn.b_O"] = torch.zeros(tl_cfg.d_model)
        sd[p + "ln1.w"] = layer.input_layernorm.weight
        sd[p + "ln2.w"] = layer.post_attention_layernorm.weight
        sd[p + "mlp.W_in"] = mlp.up_proj.weight.T
        sd[p + "mlp.W_gate"] = mlp.gate_proj.weight.T
        sd[p + "mlp.W_out"] = mlp.down_proj.weight.T
        sd[p + "mlp.b_in"] = torch.zeros(tl_cfg.d_mlp)
        sd[p + "mlp.b_out"] = torch.zeros(tl_cfg.d_model)
    return {k: v.detach().contiguous() for k, v in sd.items()}


@torch.no_grad()
def _load_into_tl_replacement(model, sd: dict[str, torch.Tensor]) -> None:
    """Copy TL-named weights into a TransformerLens replacement model. circuit-tracer wrapped
    block.mlp and unembed (ReplacementMLP.old_mlp, ReplacementUnembed.old_unembed), so the
    model's own parameter names carry an extra component."""
    params = dict(model.named_parameters())
    loaded = set()
    for name, param in params.items():
        if name.startswith("transcoders."):
            continue
        key = name.replace(".old_mlp.", ".").replace(".old_unembed.", ".")
        if key not in sd:
            raise RuntimeError(f"no Llama weight for TransformerLens parameter {name}")
        param.copy_(sd[key])
        loaded.add(key)
    missing = set(sd) - loaded
    if missing:
        raise RuntimeError(f"TransformerLens model has no parameters for {sorted(missing)}")


def _random_unit_rows(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """Gaussian random vectors along the last dim, normalised to unit length."""
    w = torch.randn(*shape, generator=gen)
    return w / w.norm(dim=-1, keepdim=True)


def _random_skip(gen: torch.Generator, d_model: int) -> torch.Tensor:
    # A small random linear map (operator norm ~0.2) so the skip path is present but does not
    # dominate the features.
    return torch.randn(d_model, d_model, generator=gen) * (0.1 / math.sqrt(d_model))


@torch.no_grad()
def _build_transcoders(
    kind: TranscoderKind,
    activation: Activation,
    n_layers: int,
    d_model: int,
    d_transcoder: int,
    skip_connection: bool,
    gen: torch.Generator,
    gen_skip: torch.Generator,
    hooks: tuple[str, str] = (_FEATURE_INPUT_HOOK, _FEATURE_OUTPUT_HOOK),
):
    """Transcoders with random unit encoder / decoder directions and zero biases, on the CPU in
    float32; _calibrate then sets biases, thresholds and decoder scales in place."""
    import torch.nn.functional as F
    from circuit_tracer.transcoder import SingleLayerTranscoder, TranscoderSet
    from circuit_tracer.transcoder.activation_functions import JumpReLU
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder

    f32, cpu = torch.float32, torch.device("cpu")
    if kind == "plt":
        layers = {}
        for layer in range(n_layers):
            # JumpReLU's bandwidth only matters for training gradients; 0.1 as in
            # circuit-tracer's own loaders.
            act_fn = (
                JumpReLU(torch.zeros(d_transcoder), bandwidth=0.1)
                if activation == "jumprelu"
                else F.relu
            )
            tc = SingleLayerTranscoder(
                d_model,
                d_transcoder,
                act_fn,
                layer,
                skip_connection=skip_connection,
                device=cpu,
                dtype=f32,  # the constructor's default is bfloat16
            )
            tc.W_enc.copy_(_random_unit_rows(gen, d_transcoder, d_model))
            tc.W_dec.copy_(_random_unit_rows(gen, d_transcoder, d_model))
            if skip_connection:
                tc.W_skip.copy_(_random_skip(gen_skip, d_model))
            layers[layer] = tc
        return TranscoderSet(
            layers,
            feature_input_hook=hooks[0],
            feature_output_hook=hooks[1],
            scan="fastattr-synthetic-plt",
        )

    clt = CrossLayerTranscoder(
        n_layers,
        d_transcoder,
        d_model,
        activation_function="jump_relu" if activation == "jumprelu" else "relu",
        skip_connection=skip_connection,
        lazy_decoder=False,  # the default (True) reads decoders from safetensors files
        lazy_encoder=False,
        feature_input_hook=hooks[0],
        feature_output_hook=hooks[1],
        scan="fastattr-synthetic-clt",
        device=cpu,
        dtype=f32,
    )
    clt.W_enc.copy_(_random_unit_rows(gen, n_layers, d_transcoder, d_model))
    for layer in range(n_layers):
        # W_dec[layer]: (d_transcoder, n_layers - layer, d_model): one decoder per feature and
        # per output layer >= layer.
        clt.W_dec[layer].copy_(_random_unit_rows(gen, d_transcoder, n_layers - layer, d_model))
        if skip_connection:
            # The CLT applies it as x @ W_skip[layer] (the PLT as x @ W_skip.T); a random
            # matrix needs no transposing either way.
            clt.W_skip[layer].copy_(_random_skip(gen_skip, d_model))
    return clt


def _calibration_tokens(
    n_positions: int, tok_size: int, gen: torch.Generator, seq_len: int = 128
) -> torch.Tensor:
    """A (n_seq, 1 + seq_len) batch of random sequences, each starting with <bos>, covering
    ~n_positions positions besides the <bos>.

    Tokens are drawn uniformly from the non-special ids. Short-ish sequences, because firing
    rates drift a little with position and tests / demos mostly use short prompts.
    """
    n_seq = max(1, math.ceil(n_positions / seq_len))
    toks = torch.randint(len(_SPECIAL_TOKENS), tok_size, (n_seq, seq_len), generator=gen)
    bos = torch.full((n_seq, 1), _SPECIAL_TOKENS.index(_BOS))
    return torch.cat([bos, toks], dim=1)


@torch.no_grad()
def _collect_mlp_io(hf, tokens: torch.Tensor):
    """Inputs and outputs of every layer's MLP (= mlp.hook_in / mlp.hook_out) of the HF Llama
    on the calibration tokens, <bos> positions dropped (circuit-tracer zeroes position 0):
    two lists of (n_positions, d_model) tensors."""
    n_layers = len(hf.model.layers)
    ins: list[torch.Tensor] = [torch.empty(0)] * n_layers
    outs: list[torch.Tensor] = [torch.empty(0)] * n_layers

    def make_hook(layer):
        def hook(module, args, output):
            d = output.shape[-1]
            ins[layer] = args[0][:, 1:].reshape(-1, d)
            outs[layer] = output[:, 1:].reshape(-1, d)

        return hook

    handles = [
        layer.mlp.register_forward_hook(make_hook(i)) for i, layer in enumerate(hf.model.layers)
    ]
    try:
        # Only the hidden states are needed; skip the (n_seq, seq_len, d_vocab) logits.
        hf.model(input_ids=tokens, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return ins, outs


@torch.no_grad()
def _calibrate(
    transcoders,
    kind: TranscoderKind,
    activation: Activation,
    mlp_in: list[torch.Tensor],
    mlp_out: list[torch.Tensor],
    density: float,
) -> None:
    """Set encoder biases / thresholds for the target firing density and scale the decoders to
    the MLP output norm, from the model's own MLP inputs / outputs on random tokens.

    For each feature f with encoder row w_f, q_f is the (1 - density) quantile of w_f . x over
    the calibration positions. ReLU: b_f = -q_f, so the feature is positive exactly on the top
    `density` fraction of positions. JumpReLU: b_f = tau_f - q_f and threshold tau_f (half the
    pre-activation spread), so the same positions pass the threshold and activations jump to
    >= tau_f, as in trained JumpReLU transcoders.
    """
    n_layers = len(mlp_in)
    n_pos = mlp_in[0].shape[0]
    k = max(1, min(n_pos, round(density * n_pos)))

    def enc(layer):
        return transcoders.W_enc[layer] if kind == "clt" else transcoders[layer].W_enc

    def set_bias_threshold(layer, b, tau):
        if kind == "clt":
            transcoders.b_enc[layer].copy_(b)
            if tau is not None:
                transcoders.activation_function.threshold[layer, 0].copy_(tau)
        else:
            transcoders[layer].b_enc.copy_(b)
            if tau is not None:
                transcoders[layer].activation_function.threshold.copy_(tau)

    # Mean over positions of sum_f a_f^2 per layer, used below to scale the decoders. Only this
    # scalar is kept: dense activations of every layer would not fit for large transcoders.
    act_energy = []
    for layer in range(n_layers):
        pre = mlp_in[layer] @ enc(layer).T  # (n_pos, d_transcoder), bias excluded
        q = pre.topk(k, dim=0).values[-1]  # per-feature k-th largest = (1 - density) quantile
        if activation == "jumprelu":
            tau = 0.5 * pre.std(dim=0)
            b = tau - q
            a = pre + b
            a = a * (a > tau)
        else:
            tau = None
            b = -q
            a = torch.relu(pre + b)
        set_bias_threshold(layer, b, tau)
        act_energy.append(a.pow(2).sum(-1).mean().clamp_min(1e-12))
        del pre, a

    # Decoder scale: one scalar per (source, output) layer pair, so that the mean squared norm
    # of the feature reconstruction matches that of the true MLP output. Random unit decoders
    # are nearly orthogonal, so ||sum_f a_f d_f||^2 ~ sum_f a_f^2 and the scale is closed form.
    for out_layer in range(n_layers):
        target = mlp_out[out_layer].pow(2).sum(-1).mean()
        # CLT: every layer <= out_layer writes here; split the target evenly among them.
        sources = range(out_layer + 1) if kind == "clt" else [out_layer]
        share = target / len(sources)
        for src in sources:
            scale = (share / act_energy[src]).sqrt()
            if kind == "clt":
                transcoders.W_dec[src][:, out_layer - src].mul_(scale)
            else:
                transcoders[src].W_dec.mul_(scale)


def make_replacement_model(
    *,
    backend: Backend = "transformerlens",
    transcoder: TranscoderKind = "plt",
    n_layers: int = 2,
    d_model: int = 64,
    d_transcoder: int = 128,
    n_heads: int = 4,
    d_vocab: int = 512,
    d_mlp: int | None = None,
    n_ctx: int = 2048,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    tokenizer_dir: str | os.PathLike | None = None,
    activation: Activation = "relu",
    feature_density: float | None = None,
    skip_connection: bool = False,
    architecture: Architecture = "llama",
    n_kv_heads: int | None = None,
    feature_hooks: tuple[str, str] | None = None,
):
    """A random-weight circuit-tracer ``ReplacementModel``, built offline.

    The network is a small Llama (RMSNorm, rotary attention, gated SiLU MLP, untied
    embeddings, no biases), drawn once as an HF ``LlamaForCausalLM``:

    * ``backend="nnsight"``: that HF model, wrapped by circuit-tracer's
      ``NNSightReplacementModel``;
    * ``backend="transformerlens"``: a ``HookedTransformer`` with the same weights.

    So for the same arguments both backends compute the same function with the same
    transcoders, and their attribution graphs agree up to floating-point error.

    Args:
        backend: "transformerlens" or "nnsight".
        transcoder: "plt" (a ``TranscoderSet`` of ``SingleLayerTranscoder``) or "clt" (one
            ``CrossLayerTranscoder`` with in-memory decoders).
        n_layers, d_model, n_heads, d_mlp (default 4 * d_model): model shape.
        n_ctx: the longest sequence the model takes (TransformerLens builds its rotary tables
            and causal mask this long).
        d_transcoder: features per layer.
        d_vocab: vocabulary size of the model, and of the tokenizer built for it (a tokenizer
            already in ``tokenizer_dir`` may be smaller).
        seed: model, transcoders and calibration data are all functions of the seed.
        dtype, device: where the finished model lives. Weights are drawn on the CPU in float32
            and calibrated in float32 (on ``device``), so they do not depend on either beyond
            rounding.
        tokenizer_dir: folder for the tokenizer (default :func:`default_tokenizer_dir`); it is
            built there if the folder holds none.
        activation: "relu" or "jumprelu" transcoder nonlinearity.
        feature_density: target fraction of features active per (layer, position) on random
            text. Default ``min(0.2, 64 / d_transcoder)``: ~64 per layer for large transcoders,
            at most 20% of them for small ones.
        skip_connection: give the transcoders a small random ``W_skip``. Drawn from its own
            random stream, so the other weights are the same with or without it.
        architecture: "llama" (both backends), or, TransformerLens only, "gpt2" (LayerNorm with
            bias, learned absolute positions, GELU MLP) or "gemma2" (RMSNorm before and after
            each sublayer, rotary, gated GELU MLP, attention-score soft cap). These two are
            drawn by TransformerLens' own initialiser, with norm weights perturbed around 1.
        n_kv_heads: key/value heads for grouped-query attention ("gemma2" and "gpt2" only;
            default: one per head).
        feature_hooks: (feature_input_hook, feature_output_hook) of the transcoders, default
            ("mlp.hook_in", "mlp.hook_out"); TransformerLens also takes "hook_resid_mid" or
            "ln2.hook_normalized" as input and "hook_mlp_out" as output. Transcoders are then
            calibrated on the TransformerLens model's own activations at those hooks.

    Returns:
        A ``TransformerLensReplacementModel`` or ``NNSightReplacementModel``, ready for
        ``circuit_tracer.attribute``.
    """
    from circuit_tracer import ReplacementModel
    from transformers import LlamaForCausalLM

    if backend not in ("transformerlens", "nnsight"):
        raise ValueError(f"backend must be 'transformerlens' or 'nnsight', got {backend!r}")
    if transcoder not in ("plt", "clt"):
        raise ValueError(f"transcoder must be 'plt' or 'clt', got {transcoder!r}")
    if activation not in ("relu", "jumprelu"):
        raise ValueError(f"activation must be 'relu' or 'jumprelu', got {activation!r}")
    if d_model % n_heads:
        raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
    if architecture not in ("llama", "gpt2", "gemma2"):
        raise ValueError(f"architecture must be 'llama', 'gpt2' or 'gemma2', got {architecture!r}")
    hooks = tuple(feature_hooks) if feature_hooks is not None else (_FEATURE_INPUT_HOOK, _FEATURE_OUTPUT_HOOK)
    native_tl = architecture != "llama" or hooks != (_FEATURE_INPUT_HOOK, _FEATURE_OUTPUT_HOOK)
    if backend == "nnsight" and native_tl:
        raise ValueError(
            f"architecture/feature_hooks: the nnsight backend builds Llama models with mlp.hook_in/mlp.hook_out "
            f"transcoders, got architecture={architecture!r}, feature_hooks={hooks}"
        )
    if n_kv_heads is not None and (architecture == "llama" or n_heads % n_kv_heads):
        raise ValueError(f"n_kv_heads: expected a divisor of n_heads={n_heads} with architecture 'gpt2' or 'gemma2', "
                         f"got {n_kv_heads} with {architecture!r}")  # fmt: skip
    density = _default_density(d_transcoder) if feature_density is None else feature_density
    if not 0.0 < density <= 1.0:
        raise ValueError(f"feature_density must be in (0, 1], got {density}")
    d_mlp = 4 * d_model if d_mlp is None else d_mlp

    if tokenizer_dir is None:
        tokenizer_dir = default_tokenizer_dir(d_vocab)
    if _saved_vocab_size(Path(tokenizer_dir)) is None:
        build_tokenizer(tokenizer_dir, vocab_size=d_vocab)
    tokenizer_dir = os.path.abspath(os.fspath(tokenizer_dir))
    tok_size = _saved_vocab_size(Path(tokenizer_dir))
    assert tok_size is not None
    if tok_size > d_vocab:
        raise ValueError(f"tokenizer in {tokenizer_dir} has {tok_size} tokens > d_vocab={d_vocab}")

    llama_cfg = _llama_config(n_layers, d_model, n_heads, d_mlp, d_vocab, n_ctx, tokenizer_dir)
    device = torch.device(device)
    if native_tl:
        model = _native_tl_model(architecture, llama_cfg, n_ctx, tokenizer_dir, n_kv_heads, seed, hooks, transcoder,
                                 activation, d_transcoder, skip_connection, density, tok_size, device)  # fmt: skip
        _move(model, backend, device, dtype)
        return model

    # Fork the global RNG: the HF initialiser draws from it, and building a model should not
    # change the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = LlamaForCausalLM(llama_cfg).eval()
        # Separate streams, so that e.g. skip_connection=True adds W_skip without changing the
        # encoders and decoders the same seed gives without it.
        gen_tc = torch.Generator().manual_seed(seed + 1)
        gen_skip = torch.Generator().manual_seed(seed + 2)
        gen_calib = torch.Generator().manual_seed(seed + 3)
        transcoders = _build_transcoders(
            transcoder,
            activation,
            n_layers,
            d_model,
            d_transcoder,
            skip_connection,
            gen=gen_tc,
            gen_skip=gen_skip,
        )
        calib_tokens = _calibration_tokens(
            # Enough positions that each feature's top `density` fraction holds >= ~32 samples
            # (a usable quantile estimate), bounded so calibration stays cheap for large
            # transcoders.
            int(min(2048, max(512, math.ceil(32 / density)))),
            tok_size,
            gen_calib,
        )

    # Calibrate on the HF model, not on a wrapped one, so that both backends get identical
    # transcoders; in float32 on the target device (fast for large models on a GPU; on another
    # device the biases may differ from the CPU's at rounding level).
    hf.to(device)
    transcoders.to(device)
    mlp_in, mlp_out = _collect_mlp_io(hf, calib_tokens.to(device))
    _calibrate(transcoders, transcoder, activation, mlp_in, mlp_out, density)
    del mlp_in, mlp_out

    # The replacement models are built on the CPU in float32 (what both configs say), get
    # their weights copied from `hf`, and are moved / cast at the end.
    if backend == "nnsight":
        # from_config builds its own HF model from the config (and loads the tokenizer from
        # config._name_or_path). Its random initialisation would be overwritten anyway, so skip
        # it where transformers allows (and keep the caller's RNG state where it does not).
        with torch.random.fork_rng(devices=[]), _hf_init_skipped():
            model = ReplacementModel.from_config(llama_cfg, transcoders, backend="nnsight")
        # Assigning model.transcoders made them a submodule of the HF model itself (nnsight
        # forwards module attributes to the wrapped module), hence strict=False.
        res = model._model.load_state_dict(hf.state_dict(), strict=False)
        stray = [k for k in res.missing_keys if not k.startswith("transcoders.")]
        if stray or res.unexpected_keys:
            raise RuntimeError(f"weight copy mismatch: {stray} {res.unexpected_keys}")
    else:
        tl_cfg = _tl_config(llama_cfg, n_ctx, tokenizer_dir)
        model = ReplacementModel.from_config(tl_cfg, transcoders, backend="transformerlens")
        _load_into_tl_replacement(model, _llama_to_tl_state_dict(hf, tl_cfg))
    del hf

    _move(model, backend, device, dtype)
    return model


def _native_tl_config(architecture: str, llama_cfg, n_ctx: int, tokenizer_dir: str, n_kv_heads: int | None):
    """A TransformerLens config for the TL-only architectures (or Llama, for other hooks)."""
    from transformer_lens import HookedTransformerConfig

    if architecture == "llama":
        return _tl_config(llama_cfg, n_ctx, tokenizer_dir)
    d_model, n_heads = llama_cfg.hidden_size, llama_cfg.num_attention_heads
    d_head = d_model // n_heads
    common = dict(
        n_layers=llama_cfg.num_hidden_layers, d_model=d_model, n_ctx=n_ctx, d_head=d_head, n_heads=n_heads,
        d_mlp=llama_cfg.intermediate_size, d_vocab=llama_cfg.vocab_size, model_name=f"fastattr-synthetic-{architecture}",
        tokenizer_name=tokenizer_dir, dtype=torch.float32, device="cpu", default_prepend_bos=True,
        n_key_value_heads=n_kv_heads, initializer_range=1.0 / math.sqrt(d_model),
    )  # fmt: skip
    if architecture == "gpt2":
        return HookedTransformerConfig(**common, act_fn="gelu_new", normalization_type="LN",
                                       positional_embedding_type="standard", original_architecture="GPT2LMHeadModel")  # fmt: skip
    return HookedTransformerConfig(
        **common, act_fn="gelu_pytorch_tanh", gated_mlp=True, normalization_type="RMS", final_rms=True,
        use_normalization_before_and_after=True, positional_embedding_type="rotary", rotary_dim=d_head,
        rotary_adjacent_pairs=False, attn_scores_soft_cap=50.0, output_logits_soft_cap=30.0, eps=1e-6,
        original_architecture="Gemma2ForCausalLM",
    )  # fmt: skip


@torch.no_grad()
def _native_tl_model(architecture, llama_cfg, n_ctx, tokenizer_dir, n_kv_heads, seed, hooks, kind, activation,
                     d_transcoder, skip_connection, density, tok_size, device):  # fmt: skip
    """A TransformerLens replacement model whose transcoders are calibrated at ``hooks`` on the
    model itself (the other builders calibrate on the HF Llama at the MLP's input and output)."""
    from circuit_tracer import ReplacementModel
    from transformers import LlamaForCausalLM

    tl_cfg = _native_tl_config(architecture, llama_cfg, n_ctx, tokenizer_dir, n_kv_heads)
    d_model, n_layers = tl_cfg.d_model, tl_cfg.n_layers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = LlamaForCausalLM(llama_cfg).eval() if architecture == "llama" else None
        gen_tc = torch.Generator().manual_seed(seed + 1)
        gen_skip = torch.Generator().manual_seed(seed + 2)
        gen_calib = torch.Generator().manual_seed(seed + 3)
        gen_norm = torch.Generator().manual_seed(seed + 4)
        transcoders = _build_transcoders(kind, activation, n_layers, d_model, d_transcoder, skip_connection,
                                         gen=gen_tc, gen_skip=gen_skip, hooks=hooks)  # fmt: skip
        calib_tokens = _calibration_tokens(int(min(2048, max(512, math.ceil(32 / density)))), tok_size, gen_calib)
        model = ReplacementModel.from_config(tl_cfg, transcoders, backend="transformerlens")
    if hf is not None:
        _load_into_tl_replacement(model, _llama_to_tl_state_dict(hf, tl_cfg))
        del hf
    else:
        # Norm weights away from 1 and LayerNorm biases away from 0, so that both are exercised.
        for name, param in model.named_parameters():
            if name.startswith("transcoders."):
                continue
            if name.endswith(".w") and param.ndim == 1:
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen_norm))
            elif name.endswith(".b") and param.ndim == 1:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen_norm))
    model.to(device, print_details=False)
    mlp_in, mlp_out = _collect_tl_io(model, calib_tokens.to(device), hooks)
    _calibrate(transcoders, kind, activation, mlp_in, mlp_out, density)
    return model


@torch.no_grad()
def _collect_tl_io(model, tokens: torch.Tensor, hooks: tuple[str, str]):
    """The activations at the transcoders' input and output hooks, <bos> positions dropped."""
    n_layers = model.cfg.n_layers
    names = [f"blocks.{i}.{h}" for h in hooks for i in range(n_layers)]
    _, cache = model.run_with_cache(tokens, names_filter=names, return_type=None)
    d = model.cfg.d_model
    take = [cache[n][:, 1:].reshape(-1, d).float() for n in names]
    return take[:n_layers], take[n_layers:]


def _hf_init_skipped():
    """transformers' context that turns weight initialisation into a no-op (what
    from_pretrained uses), or a no-op context where it is not available."""
    try:
        from transformers.modeling_utils import no_init_weights
    except ImportError:  # pragma: no cover - other transformers versions
        return contextlib.nullcontext()
    return no_init_weights()


def _raw_transcoders(model):
    """The transcoder module itself: nnsight wraps module attributes in an Envoy."""
    tc = model.transcoders
    return getattr(tc, "_module", tc)


def _move(model, backend: Backend, device: torch.device, dtype: torch.dtype) -> None:
    """Move / cast model and transcoders after calibration."""
    if device == torch.device("cpu") and dtype == torch.float32:
        return
    transcoders = _raw_transcoders(model)
    if backend == "transformerlens":
        # HookedTransformer.to (unlike nn.Module.to) also updates cfg.device / cfg.dtype, which
        # TL components read later.
        model.to(device, print_details=False)
        model.to(dtype, print_details=False)
    else:
        # Envoy.to only takes a device, so convert the raw HF module. nn.Module.to converts
        # parameters in place, so circuit-tracer's cached embed_weight / unembed_weight
        # references follow.
        model._model.to(device=device, dtype=dtype)
    transcoders.to(device, dtype)
