"""The synthetic word-level tokenizer and random prompts in its vocabulary.

circuit-tracer 0.5.0 shapes the tokenizer:

* ``ensure_tokenized`` tokenizes with ``add_special_tokens=False`` and prepends a special token
  unless the first token is already special; it picks the first *truthy* id among
  ``bos/pad/eos/...``, so the BOS id must not be 0 (``filter(None, ...)`` drops id 0). Position
  0 is then zeroed out of the graph (``model.zero_positions == slice(0, 1)``).
* The attribution targets use ``tokenizer.vocab_size`` as the graph's vocab size and decode
  logit indices with the tokenizer, so ``len(tokenizer) <= d_vocab`` is required (the models
  make them equal by default).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

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
