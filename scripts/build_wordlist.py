"""Build oml_core/data/words.txt, the project's own word list (run once; the output is committed).

Sources: words of everyday English written for this project, plus prose words from the Python
standard library's documentation (`pydoc_data.topics`), filtered to lowercase letters, 3-11
characters, seen at least three times, and not Python keywords or builtins.
"""

import builtins
import collections
import keyword
import re
from pathlib import Path

from pydoc_data.topics import topics

EVERYDAY = """
apple river mountain garden window morning evening summer winter autumn spring village
market bridge forest ocean island valley castle harbor meadow candle letter journey story
family friend teacher doctor farmer painter sailor soldier captain traveler neighbor child
kitchen table chair blanket pillow mirror basket bottle hammer ladder lantern pencil paper
orange lemon bread butter cheese honey coffee sugar salt pepper onion carrot potato tomato
horse rabbit tiger eagle falcon dolphin whale turtle spider beetle sparrow pigeon kitten
yellow purple silver golden crimson bright quiet gentle brave clever honest humble patient
wander gather listen whisper remember imagine believe discover explore travel wonder build
climb paint dance sing laugh smile dream travel carry follow notice borrow answer promise
thunder lightning rainbow cloud storm breeze shadow sunlight moonlight starlight snow rain
library museum theater station airport hospital school college office factory temple tower
engine wheel rocket planet comet galaxy crystal diamond marble copper velvet cotton wool
minute hour season century moment future history memory silence courage freedom harmony
""".split()


def build() -> list[str]:
    text = " ".join(topics.values())
    counts = collections.Counter(re.findall(r"(?<![\w.])([a-z]{3,11})(?![\w(.])", text))
    banned = set(keyword.kwlist) | set(dir(builtins)) | {
        "args", "kwargs", "self", "def", "elif", "init", "repr", "dict", "len", "iter", "obj",
        "func", "cls", "attr", "getattr", "setattr", "abc", "arg", "foo", "bar", "baz"}
    docs = {w for w, n in counts.items()
            if n >= 3 and w not in banned and re.search(r"[aeiouy]", w)}
    return sorted(docs | set(EVERYDAY))


if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "oml_core" / "data" / "words.txt"
    words = build()
    out.write_text("\n".join(words) + "\n", encoding="utf-8")
    print(f"{len(words)} words -> {out}")
