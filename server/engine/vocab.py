"""A model's vocabulary and metadata: tokenize, detokenize, token pieces, end-of-generation tokens, the chat
template.

The engine core looks tokens up through its LlamaRuntime (a Vocabulary over the loaded model); the engine's
front loads the same file with its vocabulary only (`Vocabulary.load`: no weights, no device), so text work
never needs the process that owns the weights. llama.cpp's vocabulary calls are thread-safe.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp.llama_cpp as lc

from server.engine.errors import ModelLoadError
from server.llama import loader


class Vocabulary:
    """The vocabulary of the llama.cpp model `model` (a pointer this object owns from `load`)."""

    def __init__(self, model: int) -> None:
        self.model: int = model
        self.vocab: int = lc.llama_model_get_vocab(model)
        self.n_vocab: int = lc.llama_vocab_n_tokens(self.vocab)
        self.bos: int = lc.llama_vocab_bos(self.vocab)
        self.eos: int = lc.llama_vocab_eos(self.vocab)
        self.add_bos: bool = bool(lc.llama_vocab_get_add_bos(self.vocab))
        self._pieces: list[bytes | None] = [None] * self.n_vocab
        self._eog: bytearray = bytearray(self.n_vocab)  # 0 unknown, 1 no, 2 yes
        self._eog_all: tuple[int, ...] | None = None
        self._owned = False

    @classmethod
    def load(cls, path: str | Path, verbose: bool = False) -> Vocabulary:
        """The vocabulary of the GGUF at `path`, read without its weights."""
        loader.init_backend(verbose)
        try:
            vocab = cls(loader.load_vocab(path))
        except loader.LlamaLoadError as exc:
            raise ModelLoadError(str(exc)) from None
        vocab._owned = True
        return vocab

    def free(self) -> None:
        """Free a vocabulary `load` made (a LlamaRuntime frees its model itself)."""
        if self._owned and self.model:
            loader.free(self.model)
            self.model = 0

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (lc.llama_token * cap)()
        n = lc.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (lc.llama_token * cap)()
            n = lc.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        ids = list(buf[:n])
        # Chat templates often write the BOS text themselves; do not start with two BOS tokens.
        if add_special and len(ids) >= 2 and ids[0] == self.bos and ids[1] == self.bos:
            del ids[0]
        return ids

    def piece(self, token: int) -> bytes:
        """The bytes of one token as generated text (control tokens render empty). Cached per token."""
        cached = self._pieces[token]
        if cached is not None:
            return cached
        buf = ctypes.create_string_buffer(64)  # per call: the engine thread and the event loop both look up
        n = lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            bigger = ctypes.create_string_buffer(-n)
            n = lc.llama_token_to_piece(self.vocab, token, bigger, len(bigger), 0, False)
            data = bigger.raw[:n]
        else:
            data = buf.raw[:n]
        self._pieces[token] = data
        return data

    def detokenize(self, ids: list[int], special: bool = False) -> str:
        if not ids:
            return ""
        arr = (lc.llama_token * len(ids))(*ids)
        cap = len(ids) * 8 + 16
        buf = ctypes.create_string_buffer(cap)
        n = lc.llama_detokenize(self.vocab, arr, len(ids), buf, cap, False, special)
        if n < 0:
            cap = -n
            buf = ctypes.create_string_buffer(cap)
            n = lc.llama_detokenize(self.vocab, arr, len(ids), buf, cap, False, special)
        return buf.raw[:n].decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        state = self._eog[token]
        if state == 0:
            state = 2 if lc.llama_vocab_is_eog(self.vocab, token) else 1
            self._eog[token] = state
        return state == 2

    def eog_tokens(self) -> tuple[int, ...]:
        """All end-of-generation tokens (scans the vocabulary once)."""
        if self._eog_all is None:
            self._eog_all = tuple(t for t in range(self.n_vocab) if self.is_eog(t))
        return self._eog_all

    def token_text(self, token: int) -> str:
        """The vocabulary's text of a token (for special tokens such as BOS in chat templates)."""
        if token < 0 or token >= self.n_vocab:
            return ""
        raw = lc.llama_vocab_get_text(self.vocab, token)
        return raw.decode("utf-8", errors="replace") if raw else ""

    def meta(self, key: str) -> str | None:
        size = 256
        while True:
            buf = ctypes.create_string_buffer(size)
            n = lc.llama_model_meta_val_str(self.model, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = n + 1

    def chat_template(self) -> str | None:
        raw = lc.llama_model_chat_template(self.model, None)
        return raw.decode("utf-8", errors="replace") if raw else None
