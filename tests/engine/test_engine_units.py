"""Pure parts of the engine: stop strings, UTF-8-safe deltas, chat templates, prefix matching, config."""

from __future__ import annotations

import pytest

from server.engine.chat_template import CHATML_TEMPLATE, ChatTemplate, ChatTemplateError
from server.engine.config import MIN_N_CTX, EngineConfig, cap_n_ctx
from server.engine.detokenizer import IncrementalDetokenizer, complete_utf8_len
from server.engine.kv_cache import common_prefix_len
from server.engine.stops import StopMatcher


def feed_all(matcher: StopMatcher, deltas: list[str]) -> tuple[list[str], bool]:
    out = []
    for d in deltas:
        text, hit = matcher.feed(d)
        out.append(text)
        if hit:
            return out, True
    out.append(matcher.flush())
    return out, False


def test_stop_string_split_across_deltas_is_never_sent() -> None:
    out, hit = feed_all(StopMatcher(("</end>",)), ["Hello </", "en", "d> tail"])
    assert hit
    assert "".join(out) == "Hello "
    assert out[0] == "Hello "  # "</" is held back: it could begin the stop string


def test_held_prefix_is_released_when_it_does_not_complete() -> None:
    out, hit = feed_all(StopMatcher(("STOP",)), ["a ST", "ORE b"])
    assert not hit
    assert out == ["a ", "STORE b", ""]


def test_earliest_of_several_stop_strings_wins() -> None:
    out, hit = feed_all(StopMatcher(("world", "lo w")), ["hello world"])
    assert hit and "".join(out) == "hel"


def test_no_stop_strings_pass_text_through() -> None:
    matcher = StopMatcher(())
    assert not matcher.is_active
    assert matcher.feed("abc") == ("abc", False)


def test_complete_utf8_len_never_cuts_a_character() -> None:
    data = "aé日🙂".encode()
    for cut in range(len(data) + 1):
        n = complete_utf8_len(data[:cut])
        data[:n].decode("utf-8")  # always decodes
        assert n >= cut - 3


def test_detokenizer_waits_for_the_rest_of_a_character() -> None:
    pieces = {1: b"caf", 2: "é".encode()[:1], 3: "é".encode()[1:] + b" ", 4: "🙂".encode()[:2],
              5: "🙂".encode()[2:]}
    detok = IncrementalDetokenizer(pieces.__getitem__)
    deltas = [detok.push(t) for t in (1, 2, 3, 4, 5)]
    assert deltas == ["caf", "", "é ", "", "🙂"]
    assert detok.flush() == ""


def test_detokenizer_flush_replaces_an_unfinished_character() -> None:
    detok = IncrementalDetokenizer({1: b"x\xe6\x97"}.__getitem__)
    assert detok.push(1) == "x"
    assert detok.flush() == "\ufffd"


def test_chatml_fallback_renders() -> None:
    template = ChatTemplate(None)
    assert template.is_fallback and template.source == CHATML_TEMPLATE
    text = template.render([{"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert not template.render([{"role": "user", "content": "Hi"}], add_generation_prompt=False).endswith(
        "assistant\n")


def test_template_variables_bos_eos_and_raise_exception() -> None:
    source = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}"
        "{{ raise_exception('no tools here') }}{% endif %}[{{ m['role'] }}]{{ m['content'] | trim }}"
        "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    template = ChatTemplate(source, bos_token="<s>", eos_token="</s>")
    assert template.render([{"role": "user", "content": " Hi "}]) == "<s>[user]Hi</s>[assistant]"
    with pytest.raises(ChatTemplateError, match="no tools here"):
        template.render([{"role": "tool", "content": "x"}])
    with pytest.raises(ChatTemplateError):
        template.render([{"content": "no role"}])
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{% for %}")


def test_template_tojson_keeps_unicode() -> None:
    template = ChatTemplate("{{ messages[0] | tojson }}")
    assert template.render([{"role": "user", "content": "é"}], add_generation_prompt=False) == (
        '{"role": "user", "content": "é"}')


def test_common_prefix_len() -> None:
    a = list(range(100))
    assert common_prefix_len(a, a, 1000) == 100
    assert common_prefix_len(a, a, 99) == 99
    assert common_prefix_len(a, [*a[:37], -1, *a[38:]], 1000) == 37
    assert common_prefix_len(a, [5], 10) == 0
    assert common_prefix_len([], a, 10) == 0


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="n_batch"):
        EngineConfig(model_path="m.gguf", n_parallel=8, n_batch=4, n_ubatch=4)
    with pytest.raises(ValueError, match="kv_type"):
        EngineConfig(model_path="m.gguf", kv_type="q3")
    with pytest.raises(ValueError):
        EngineConfig(model_path="m.gguf", n_ctx=8, n_parallel=8)
    cfg = EngineConfig(model_path="m.gguf", kv_type="q8_0", n_threads=3)
    assert cfg.kv_ggml_type == 8 and cfg.threads == 3 and cfg.threads_batch == 3


def test_n_ctx_is_one_sequence_and_the_pool_is_derived() -> None:
    cfg = EngineConfig(model_path="m.gguf", n_ctx=1024, n_parallel=4)
    assert cfg.n_ctx == 1024 and cfg.n_ctx_total == 4096  # what llama.cpp's cparams.n_ctx gets
    assert EngineConfig(model_path="m.gguf", n_ctx=1024, n_parallel=4, kv_unified=True).n_ctx_total == 4096
    with pytest.raises(ValueError, match=f"greater than or equal to {MIN_N_CTX}"):
        EngineConfig(n_ctx=MIN_N_CTX - 1)
    # one cap at the training context (the engine applies it to what the loaded model reports)
    assert cap_n_ctx(16384, 8192) == 8192 and cap_n_ctx(4096, 8192) == 4096 and cap_n_ctx(4096, 0) == 4096


def test_ubatch_follows_the_batch_and_a_quantized_cache_needs_flash_attention() -> None:
    assert EngineConfig(n_batch=128).n_ubatch == 128  # as llama.cpp: n_ubatch = min(n_batch, n_ubatch)
    assert EngineConfig(n_batch=1024, n_ubatch=256).n_ubatch == 256
    with pytest.raises(ValueError, match="flash attention"):
        EngineConfig(kv_type="q8_0", flash_attn="off")
    assert EngineConfig(kv_type="q8_0", flash_attn="auto").kv_type == "q8_0"
