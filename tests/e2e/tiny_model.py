"""A tiny random-weight llama model in GGUF, written from nothing (no download).

Shape: hidden 64, 2 layers, 4 heads, a byte-level BPE vocabulary in the GPT-2 style (the 256
byte tokens, a few merges, three ChatML control tokens) and a ChatML chat template. The
weights come from a fixed seed, so the file is the same bytes every time; it is about half a
megabyte. It generates printable-ASCII gibberish and never stops before max_tokens, which is
all a proxy test needs: real tokens, streamed by a real llama.cpp, for as long as asked.

Run as a script to write one: `python tests/e2e/tiny_model.py OUT.gguf`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np

HIDDEN_SIZE = 64
LAYER_COUNT = 2
HEAD_COUNT = 4
FEED_FORWARD_SIZE = 128
# Long enough for the cancellation test's long generation; the KV cache stays tiny.
CONTEXT_LENGTH = 32768
SEED = 20240605

# Merges in priority order; each pair's concatenation becomes a token. "Ġ" is GPT-2's space.
BPE_MERGES: tuple[tuple[str, str], ...] = (
    ("Ġ", "t"),
    ("h", "e"),
    ("i", "n"),
    ("e", "r"),
    ("Ġ", "a"),
    ("Ġt", "he"),
    ("o", "n"),
    ("r", "e"),
    ("Ġ", "s"),
    ("a", "t"),
    ("e", "n"),
    ("o", "r"),
    ("Ġ", "w"),
    ("i", "s"),
    ("Ġ", "h"),
    ("l", "l"),
    ("Ġ", "o"),
    ("e", "s"),
    ("Ġ", "i"),
    ("Ġ", "c"),
)
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
CONTROL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def gpt2_byte_tokens() -> list[str]:
    """The 256 byte tokens of GPT-2's byte-level BPE, in byte order.

    Printable bytes stand for themselves; the others are shifted to code points 256 and up, so
    that every token is a printable string (this is the mapping llama.cpp's BPE decodes).
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    tokens: list[str] = []
    shifted = 0
    for byte in range(256):
        if byte in printable:
            tokens.append(chr(byte))
        else:
            tokens.append(chr(256 + shifted))
            shifted += 1
    return tokens


def vocabulary() -> list[str]:
    """Byte tokens, then one token per merge, then the control tokens."""
    tokens = gpt2_byte_tokens()
    tokens += [left + right for left, right in BPE_MERGES]
    tokens += CONTROL_TOKENS
    assert len(set(tokens)) == len(tokens), "every token text must be unique"
    return tokens


VOCABULARY = vocabulary()
VOCAB_SIZE = len(VOCABULARY)
ENDOFTEXT_ID = VOCABULARY.index(ENDOFTEXT)
IM_END_ID = VOCABULARY.index(IM_END)


def can_be_generated(token: str) -> bool:
    """Printable ASCII only (GPT-2 writes the space as "Ġ"), and no control token.

    Why: llama-cpp-python streams a token only once its text is valid UTF-8, and while a
    stray byte keeps the text invalid it loops without yielding a chunk, so it could neither
    stream nor notice a disconnect. And a model that never ends runs exactly max_tokens long.
    """
    if token in CONTROL_TOKENS:
        return False
    return all(character == "Ġ" or " " < character <= "~" for character in token)


GENERATABLE_IDS = tuple(i for i, token in enumerate(VOCABULARY) if can_be_generated(token))

# Hidden dimension 0 carries a constant: every token embedding is CONSTANT_FEATURE there, no
# layer writes to it (row 0 of attn_output and ffn_down is zero) or reads it (norm weight 0),
# so after the final RMSNorm it is always large and positive. A negative weight in the output
# row of a token then pushes its logit far below the others, whatever the input: a bias.
CONSTANT_FEATURE = 1.0
SUPPRESSING_WEIGHT = -4.0


def random_weights(rng: np.random.Generator, *shape: int) -> np.ndarray:
    # Small values keep activations tame through the two layers (no NaNs, no saturation).
    return rng.normal(0.0, 0.02, size=shape).astype(np.float32)


def norm_weights_ignoring_constant() -> np.ndarray:
    weights = np.ones(HIDDEN_SIZE, np.float32)
    weights[0] = 0.0
    return weights


def keeping_constant(residual_projection: np.ndarray) -> np.ndarray:
    """Zero the row that would write into the constant dimension of the residual stream."""
    residual_projection[0, :] = 0.0
    return residual_projection


def write_tiny_llama_gguf(path: Path, seed: int = SEED) -> None:
    """Write the model to `path`: the same bytes for the same seed, other weights for another."""
    rng = np.random.default_rng(seed)
    head_size = HIDDEN_SIZE // HEAD_COUNT
    writer = gguf.GGUFWriter(str(path), arch="llama")

    writer.add_name("llmhop-tiny-test-llama")
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(HIDDEN_SIZE)
    writer.add_block_count(LAYER_COUNT)
    writer.add_feed_forward_length(FEED_FORWARD_SIZE)
    writer.add_head_count(HEAD_COUNT)
    writer.add_head_count_kv(HEAD_COUNT)
    writer.add_rope_dimension_count(head_size)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB_SIZE)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    # One vector per input from /v1/embeddings (llama defaults to one per token).
    writer.add_pooling_type(gguf.PoolingType.MEAN)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(VOCABULARY)
    writer.add_token_types(
        [
            gguf.TokenType.CONTROL if token in CONTROL_TOKENS else gguf.TokenType.NORMAL
            for token in VOCABULARY
        ]
    )
    writer.add_token_merges([f"{left} {right}" for left, right in BPE_MERGES])
    writer.add_bos_token_id(ENDOFTEXT_ID)
    writer.add_eos_token_id(IM_END_ID)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)

    # numpy shapes are ggml's dimensions reversed: (rows = outputs, columns = inputs).
    token_embeddings = random_weights(rng, VOCAB_SIZE, HIDDEN_SIZE)
    token_embeddings[:, 0] = CONSTANT_FEATURE
    writer.add_tensor("token_embd.weight", token_embeddings)
    for layer in range(LAYER_COUNT):
        prefix = f"blk.{layer}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", norm_weights_ignoring_constant())
        for projection in ("attn_q", "attn_k", "attn_v"):
            writer.add_tensor(
                f"{prefix}.{projection}.weight", random_weights(rng, HIDDEN_SIZE, HIDDEN_SIZE)
            )
        writer.add_tensor(
            f"{prefix}.attn_output.weight",
            keeping_constant(random_weights(rng, HIDDEN_SIZE, HIDDEN_SIZE)),
        )
        writer.add_tensor(f"{prefix}.ffn_norm.weight", norm_weights_ignoring_constant())
        for projection in ("ffn_gate", "ffn_up"):
            writer.add_tensor(
                f"{prefix}.{projection}.weight",
                random_weights(rng, FEED_FORWARD_SIZE, HIDDEN_SIZE),
            )
        writer.add_tensor(
            f"{prefix}.ffn_down.weight",
            keeping_constant(random_weights(rng, HIDDEN_SIZE, FEED_FORWARD_SIZE)),
        )
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN_SIZE, np.float32))
    output = random_weights(rng, VOCAB_SIZE, HIDDEN_SIZE)
    output[:, 0] = SUPPRESSING_WEIGHT
    output[list(GENERATABLE_IDS), 0] = 0.0
    writer.add_tensor("output.weight", output)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT.gguf")
    write_tiny_llama_gguf(Path(sys.argv[1]))
