"""Tokenizers built entirely offline for the tiny model zoo.

Real CLIP and T5 vocabularies come from the model hub; a test only needs a tokenizer with the right class, special
tokens and padding behaviour, so the ones here are built in memory:

* ``clip_tokenizer``: byte-level BPE with no merges (every byte is a token), the CLIP special tokens at the end of
  the vocabulary exactly as CLIP places them, ``model_max_length = 77``.
* ``qwen2_tokenizer``: byte-level BPE with no merges plus Qwen's chat special tokens (``<|im_start|>``,
  ``<|im_end|>``; ``<|endoftext|>`` pads), as Qwen-Image's prompt template needs them.
* ``qwen2_chat_tokenizer``: ``qwen2_tokenizer`` with the layout of Qwen2.5's chat template (``<|im_start|>role\n…
  <|im_end|>\n`` turns, ``<|im_start|>assistant\n`` as the generation prompt): HunyuanVideo 1.5 encodes its prompt
  through ``apply_chat_template``.
* ``t5_tokenizer``: a SentencePiece-style Unigram tokenizer over printable ASCII characters (T5's ``<pad>=0``,
  ``</s>=1``, ``<unk>=2`` layout, no sentinel tokens).
* ``gemma_tokenizer``: Gemma's layout (``<pad>=0``, ``<eos>=1``, ``<bos>=2``, ``<unk>=3``, ``<mask>=4``, then the 256
  byte-fallback tokens ``<0x00>``…``<0xFF>``) over printable ASCII characters with no merges, ``<bos>`` prepended as
  Gemma's tokenizer does (Sana's text encoder).
* ``mistral_tokenizer``: a byte-level BPE tokenizer with no merges laid out as Mistral's Tekken tokenizer
  (``<unk> = 0``, ``<s> = 1``, ``</s> = 2``, ``[INST]``, ``[/INST]``, ``[IMG] = 10``, ``<pad> = 11``,
  ``[SYSTEM_PROMPT] = 17``, ``[/SYSTEM_PROMPT] = 18``: the first 20 ids are control tokens, then the 256 bytes) and a
  chat template in the layout of Mistral Small 3.1's (``<s>[SYSTEM_PROMPT]…[/SYSTEM_PROMPT][INST]…[/INST]``).
  FLUX.2 [dev] ships a ``PixtralProcessor`` (tokenizer and image processor; transformers builds it only with
  torchvision), and its prompt encoding calls nothing but the processor's ``apply_chat_template`` on text, which the
  tokenizer has itself.
* ``qwen3_tokenizer``: ``qwen2_tokenizer`` plus Qwen3's thinking tokens (``<think> = 259``, ``</think> = 260``) and a
  chat template in the layout of Qwen3's (``<|im_start|>role\n…<|im_end|>\n`` per turn, the assistant turn opened by
  ``add_generation_prompt``, an empty thinking block when ``enable_thinking`` is false), as Z-Image's prompt
  encoding applies it.

All of them save with ``save_pretrained`` (``tokenizer.json`` and friends) and reload with ``from_pretrained(dir)``
offline.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import CLIPTokenizer, GemmaTokenizer, PreTrainedTokenizerFast, Qwen2Tokenizer, T5Tokenizer

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte → printable unicode symbol table (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def clip_vocab() -> dict[str, int]:
    """The 256 byte symbols, the same with ``</w>``, then ``<|startoftext|>`` and ``<|endoftext|>`` (514 tokens)."""
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [CLIP_BOS, CLIP_EOS]
    return {t: i for i, t in enumerate(tokens)}


def clip_tokenizer(model_max_length: int = CLIP_MAX_LENGTH) -> CLIPTokenizer:
    """A byte-level CLIP tokenizer with no merges. Ids: ``bos = 512``, ``eos = pad = 513``."""
    return CLIPTokenizer(vocab=clip_vocab(), merges=[], model_max_length=model_max_length)


def t5_vocab() -> list[tuple[str, float]]:
    """``<pad>``, ``</s>``, ``<unk>``, the word-start marker ``▁``, then printable ASCII characters."""
    chars = [c for c in string.printable if not c.isspace()]
    return [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [(c, -3.0) for c in chars]


def t5_tokenizer(model_max_length: int = 512) -> T5Tokenizer:
    """A character-level Unigram T5 tokenizer (``pad = 0``, ``eos = 1``, ``unk = 2``), no sentinel tokens."""
    return T5Tokenizer(vocab=t5_vocab(), extra_ids=0, model_max_length=model_max_length)


QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def qwen2_tokenizer() -> Qwen2Tokenizer:
    """A byte-level Qwen2 tokenizer with no merges: the 256 byte symbols, then ``<|endoftext|> = 256`` (pad),
    ``<|im_start|> = 257``, ``<|im_end|> = 258`` (259 tokens)."""
    symbols = list(_bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(symbols + list(QWEN_SPECIAL_TOKENS))}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=32768)
    tokenizer.add_tokens(list(QWEN_SPECIAL_TOKENS), special_tokens=True)  # matched whole, never split into bytes
    return tokenizer


# The layout of Qwen2.5's chat template for text turns (string contents, no tools): each turn as
# <|im_start|>role\ncontent<|im_end|>\n, a default system turn when none is given, then the generation prompt.
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def qwen2_chat_tokenizer() -> Qwen2Tokenizer:
    """``qwen2_tokenizer`` with Qwen2.5's chat template (``QWEN_CHAT_TEMPLATE``), for pipelines that encode their
    prompt with ``apply_chat_template`` (HunyuanVideo 1.5)."""
    tokenizer = qwen2_tokenizer()
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


GEMMA_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")


def gemma_tokenizer(model_max_length: int = 8192) -> GemmaTokenizer:
    """A character-level Gemma tokenizer: ``pad = 0``, ``eos = 1``, ``bos = 2`` (prepended), ``unk = 3``, the 256
    byte-fallback tokens (``"\\n"`` is ``<0x0A>``), ``▁`` for spaces and printable ASCII (356 tokens)."""
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    chars = [c for c in string.printable if not c.isspace()]
    vocab = {t: i for i, t in enumerate([*GEMMA_SPECIAL_TOKENS, *byte_tokens, "▁", *chars])}
    tokenizer = GemmaTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)
    bos = GEMMA_SPECIAL_TOKENS[2]
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(  # Gemma's add_bos_token
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    return tokenizer


# Mistral's Tekken control tokens, ids 0-19 as in Mistral Small 3.1 (those without a role here keep their place).
MISTRAL_CONTROL_TOKENS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
    "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
)  # fmt: skip
MISTRAL_IMAGE_TOKEN_ID = MISTRAL_CONTROL_TOKENS.index("[IMG]")
# The layout of Mistral Small 3.1's chat template: <s>, the system turn, then each user turn in [INST]…[/INST] (text
# blocks verbatim, an image block as [IMG]); assistant turns end with </s>.
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = namespace(value='') %}"
    "{%- for block in message['content'] %}"
    "{%- if block['type'] == 'text' %}{%- set text.value = text.value + block['text'] %}"
    "{%- else %}{%- set text.value = text.value + '[IMG]' %}{%- endif %}"
    "{%- endfor %}{%- set text = text.value %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}"
    "{%- else %}{{- text + eos_token }}{%- endif %}"
    "{%- endfor %}"
)


def mistral_tokenizer(model_max_length: int = 131072) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with no merges in the layout of Mistral's Tekken: the 20 control tokens
    (``MISTRAL_CONTROL_TOKENS``, ``<s> = 1``, ``</s> = 2``, ``<pad> = 11``), then the 256 byte symbols (276 tokens)."""
    symbols = list(_bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate([*MISTRAL_CONTROL_TOKENS, *symbols])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        model_max_length=model_max_length,
    )  # fmt: skip
    tokenizer.add_special_tokens({"additional_special_tokens": list(MISTRAL_CONTROL_TOKENS[3:])})
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    return tokenizer


QWEN3_THINKING_TOKENS = ("<think>", "</think>")
# The layout of Qwen3's chat template for text turns: each turn in <|im_start|>role ... <|im_end|>, then the assistant
# turn opened; with enable_thinking false an empty thinking block is written into it (Qwen3's "non-thinking" mode).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def qwen3_tokenizer() -> Qwen2Tokenizer:
    """``qwen2_tokenizer`` with Qwen3's ``<think>`` / ``</think>`` (ids 259, 260; 261 tokens) and a chat template in
    Qwen3's layout (``QWEN3_CHAT_TEMPLATE``): the tokenizer of Z-Image's Qwen3 text encoder."""
    tokenizer = qwen2_tokenizer()
    tokenizer.add_tokens(list(QWEN3_THINKING_TOKENS))
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer
