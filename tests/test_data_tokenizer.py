import hashlib
import subprocess
import sys
from importlib import resources

from speedrun.data import tokenizer


def test_gpt2_encoding_matches_the_reference_ids():
    enc = tokenizer.gpt2()
    assert enc.n_vocab == tokenizer.VOCAB_SIZE == 50257
    assert enc.eot_token == tokenizer.EOT == 50256
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert enc.encode_ordinary(" the") == [262]
    text = "Don't split   spaces,\n\nor numbers 12345 — naïvely ☃!"
    assert enc.decode(enc.encode_ordinary(text)) == text
    assert enc.encode_ordinary("we'll 've") == [732, 1183, 705, 303]


def test_documents_are_prefixed_and_special_text_stays_ordinary():
    tokens = tokenizer.encode_documents(["Hello world", "<|endoftext|>"])
    assert tokens.dtype.name == "uint16"
    assert tokens[:4].tolist() == [50256, 15496, 995, 50256]
    assert 50256 not in tokens[4:].tolist()
    assert tokenizer.decode(tokens[4:]) == "<|endoftext|>"


def test_vocabulary_is_the_shipped_file():
    data = (resources.files("speedrun") / "assets" / "gpt2.tiktoken").read_bytes()
    assert hashlib.sha256(data).hexdigest() == "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
    assert (resources.files("speedrun") / "assets" / "GPT2_LICENSE").read_text().count("OpenAI") >= 2


def test_loads_with_the_network_cut_off():
    # A fresh interpreter where opening any socket fails: nothing may be fetched or cached remotely.
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise OSError('network disabled in this test')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "from speedrun.data import tokenizer\n"
        "print(tokenizer.gpt2().encode('Hello world'))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "TIKTOKEN_CACHE_DIR": "", "HOME": "/nonexistent"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[15496, 995]"
