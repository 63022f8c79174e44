"""Fetch Multi30k task 1 (Elliott et al. 2016, 2017) and check it, for the rnmt recipe.

    python examples/multi30k/prepare.py --from ../shared/data/multi30k --out work/multi30k
    python examples/multi30k/prepare.py --download --out work/multi30k

Writes OUT/raw/{train,val,test_2016_flickr,test_2017_flickr,test_2017_mscoco}.{en,de,fr}
(plain UTF-8, one sentence a line). Every file is checked against the SHA-256 and line
count of its *decompressed* text below, so a re-compressed copy passes and a changed or
truncated one does not. The checksums were taken from the copy in ../shared/data/multi30k;
`--download` fetches the same files from the dataset's public repository (not reachable
from the machines this recipe was written on, so that path is untested here).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import sys
import urllib.request
from pathlib import Path

URL = "https://github.com/multi30k/dataset/raw/master/data/task1/raw/{name}.gz"

# name -> (sha256 of the decompressed text, number of lines)
FILES: dict[str, tuple[str, int]] = {
    "test_2016_flickr.de": ("4be6b5b3236b79c25475c6bb829800a7ce559e9ba7a1f6c2394fe4d40be46d16", 1000),
    "test_2016_flickr.en": ("399a4382932c1aadd3ceb9bef1008d388a64c76d4ae4e9d4728c6f4301cac182", 1000),
    "test_2016_flickr.fr": ("cb3160d69b002bb638e66cc7612fcd56cb0af82eadc9c142dedc438afb885ef6", 1000),
    "test_2017_flickr.de": ("c3078bc3b36808bf9d20eb2347ed6137016179ef59ec0d2b9b8ecc3fb2880081", 1000),
    "test_2017_flickr.en": ("ce1450ddc5ab0834502579d77a170849952e15a2938b34cc503bdc25ebb4fb98", 1000),
    "test_2017_flickr.fr": ("6f3764e31dac41e9455e612958bcfd4e877c5e15cd66df2c2b2be6d9bd83e5b6", 1000),
    "test_2017_mscoco.de": ("58277df3c75f92f7145a11b910b553d1cf82c439249d4dc237c899609eafac22", 461),
    "test_2017_mscoco.en": ("43051fdfa86fd5395182e718a94ca67b1b227b9f7c79596ff0f6b813216981d2", 461),
    "test_2017_mscoco.fr": ("39cde3f43f32b0a6bf29ce4917a46329ff32e53070c2fac87506695a740ae0a0", 461),
    "train.de": ("2c2b73fd2b548fbcde3a875e0a78d6ee94d498bfdee6bd3eae3945779e9ddf72", 29000),
    "train.en": ("460a15fbd157e34a7a9957ee388c1ca247fe47af3ef25fb50442af6c274e0fc6", 29000),
    "train.fr": ("5925a3c18f1587b6b54b87743106e6e8ab93618edb6f65d19eac0621f853a10d", 29000),
    "val.de": ("660e09eb7e1da2f856ea13ee5ad3cf6d36b3d5b0b733c857e94c5747a3dfc660", 1014),
    "val.en": ("1f2a23d992769b5b3d209b0a10dd0b77c08cceb1f20dfb97ed0aafa49d107227", 1014),
    "val.fr": ("5304e444d842e962b2dda4d816b70b22a1765b15401642b7ca37a67477e708dc", 1014),
}


def fetch(name: str, source: Path | None) -> bytes:
    if source is not None:
        path = source / f"{name}.gz"
        if not path.exists():
            path = source / name
        data = path.read_bytes()
    else:
        with urllib.request.urlopen(URL.format(name=name), timeout=60) as response:
            data = response.read()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--from", dest="source", type=Path, help="local copy (.gz or plain)")
    where.add_argument("--download", action="store_true", help="fetch from the public repository")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    raw = args.out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, (sha256, lines) in FILES.items():
        try:
            text = fetch(name, args.source)
        except (OSError, EOFError) as err:
            print(f"prepare: {name}: cannot read ({err})", file=sys.stderr)
            return 2
        digest, count = hashlib.sha256(text).hexdigest(), text.count(b"\n")
        if digest != sha256 or count != lines:
            print(f"prepare: {name}: checksum mismatch (got {digest}, {count} lines; "
                  f"want {sha256}, {lines})", file=sys.stderr)
            return 2
        (raw / name).write_bytes(text)
    print(f"prepare: {len(FILES)} files checked and written to {raw}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
