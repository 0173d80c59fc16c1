"""Build CLIP's vocabulary files (vocab.json, merges.txt) from OpenAI's BPE merge list.

CLIP's tokenizer ships as one gzipped text file, ``bpe_simple_vocab_16e6.txt.gz``: a header line
followed by byte-pair merges ("i n", "t h", ...), most frequent first. The 49408-entry vocabulary
is not stored anywhere; CLIP builds it at start-up, and this script does the same and writes the
two files that ``transformers.CLIPTokenizer`` reads:

    ids 0..255        the 256 bytes, each as a printable unicode character (see byte_symbols)
    ids 256..511      the same 256 symbols with "</w>" appended (a byte that ends a word)
    ids 512..49405    one token per merge, the two halves joined, for the first 48894 merges
    id  49406         <|startoftext|>
    id  49407         <|endoftext|>

The merge list holds many more merges than CLIP uses; only the first 49152 - 256 - 2 = 48894 count.

Get the .gz from the open_clip wheel (it is also in OpenAI's clip repository), then run this:

    pip download open_clip_torch==3.3.0 --no-deps -d /tmp/oc
    python weights/make_clip_vocab.py /tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl

The argument may be the wheel itself or the extracted ``bpe_simple_vocab_16e6.txt.gz``.
"""

import gzip
import json
import sys
import zipfile
from pathlib import Path

NUM_MERGES = 49152 - 256 - 2  # CLIP's vocabulary budget minus the bytes and the two specials
GZ_NAME = "open_clip/bpe_simple_vocab_16e6.txt.gz"


def byte_symbols() -> list[str]:
    """One printable character per byte value 0..255, in CLIP's vocabulary order.

    Byte-level BPE works on bytes, but its merge table is text, so each byte needs a visible
    character. Bytes that are already printable (and not a space) stand for themselves; the other
    68 (control codes, space, a few others) are mapped to the characters 256, 257, ... in order.
    The list order (printable bytes first, then the remapped ones) is the order of ids 0..255.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def read_merge_lines(path: Path) -> list[str]:
    """The lines of the gzipped merge list, from the .gz itself or from inside the open_clip wheel."""
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as wheel:
            data = gzip.decompress(wheel.read(GZ_NAME))
    else:
        data = gzip.open(path).read()
    return data.decode("utf-8").split("\n")


def build(lines: list[str]) -> tuple[dict[str, int], list[str]]:
    merges = lines[1 : NUM_MERGES + 1]  # line 0 is a header
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    vocab, merges = build(read_merge_lines(Path(sys.argv[1])))
    assert len(vocab) == 49408, len(vocab)
    out = Path(__file__).resolve().parent
    # One "token": id pair per line, so the file can be read and grepped.
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {out}")


if __name__ == "__main__":
    main()
