"""Train the tiny Mixtral-architecture fixture model on Python standard library sources.

The result is a complete Hugging Face checkpoint directory (config, bf16 safetensors
weights, generation config, byte-level BPE tokenizer with a chat template) plus a
``training_log.json`` with losses, the unigram baseline and router statistics.

Usage:
    python scripts/train_fixture.py --out mixbuild/fixtures/tiny-code
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, MixtralConfig, MixtralForCausalLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
VOCAB_SIZE = 2048
MAX_POSITIONS = 2048
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "pydoc_data", "encodings"}
MAX_FILE_BYTES = 200_000
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)
GENERATION_PROMPTS = ["def ", "import os\n", "class "]


@dataclass
class Corpus:
    train: list[str]
    heldout: list[str]
    description: dict


@dataclass
class Data:
    tokenizer: Tokenizer
    train_stream: torch.Tensor
    eval_windows: torch.Tensor
    unigram_loss: float
    corpus: dict


# --------------------------------------------------------------------------- corpus


def _stable_key(relative_path: str) -> str:
    return hashlib.sha256(relative_path.encode()).hexdigest()


def list_stdlib_sources(root: Path) -> list[Path]:
    """All eligible stdlib *.py files, ordered by a stable hash of their relative path."""
    files = [
        path
        for path in sorted(root.rglob("*.py"))
        if not SKIP_DIRS.intersection(path.relative_to(root).parts[:-1])
        and path.stat().st_size <= MAX_FILE_BYTES
    ]
    return sorted(files, key=lambda path: _stable_key(path.relative_to(root).as_posix()))


def load_corpus(corpus_bytes: int, heldout_fraction: float) -> Corpus:
    """Take files in stable hash order until `corpus_bytes`; the first slice is held out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, names, total = [], [], 0
    for path in list_stdlib_sources(root):
        if total >= corpus_bytes:
            break
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        names.append(path.relative_to(root).as_posix())
        total += len(text.encode())
    split, heldout_bytes = 0, 0
    while heldout_bytes < heldout_fraction * total:
        heldout_bytes += len(texts[split].encode())
        split += 1
    description = {
        "source": "Python standard library *.py files (sysconfig stdlib path)",
        "python_version": sys.version.split()[0],
        "skipped_dirs": sorted(SKIP_DIRS),
        "max_file_bytes": MAX_FILE_BYTES,
        "order": "sha256 of relative path",
        "files": len(texts),
        "bytes": total,
        "heldout_files": split,
        "heldout_bytes": heldout_bytes,
        "heldout_first_files": names[:3],
    }
    return Corpus(train=texts[split:], heldout=texts[:split], description=description)


# ------------------------------------------------------------------------ tokenizer


def train_tokenizer(texts: list[str]) -> Tokenizer:
    """Byte-level BPE; prepends <s> to every encoded sequence like Mistral's tokenizer."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[UNK, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    assert [tokenizer.token_to_id(t) for t in (UNK, BOS, EOS)] == [UNK_ID, BOS_ID, EOS_ID]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
    )
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, out: Path) -> None:
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": EOS,
        "model_max_length": MAX_POSITIONS,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def encode_stream(tokenizer: Tokenizer, texts: list[str]) -> torch.Tensor:
    """Concatenate `<s> document </s>` for every text into one flat token stream."""
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(texts):
        ids.extend(encoding.ids)
        ids.append(EOS_ID)
    return torch.tensor(ids, dtype=torch.long)


# ---------------------------------------------------------------------------- model


def build_config() -> MixtralConfig:
    return MixtralConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_local_experts=8,
        num_experts_per_tok=2,
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        max_position_embeddings=MAX_POSITIONS,
        sliding_window=None,
        tie_word_embeddings=False,
        router_aux_loss_coef=0.02,
        output_router_logits=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=None,
    )


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warmup then cosine decay to 10% of the peak learning rate."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def sample_batch(stream: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - seq_len, (batch,), generator=gen)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def per_layer_balance_loss(router_logits: tuple[torch.Tensor, ...], config: MixtralConfig) -> torch.Tensor:
    """Switch-style load-balancing loss applied to each layer separately, then averaged.

    The stock Mixtral loss pools all layers, which lets individual layers starve experts.
    """
    losses = [
        load_balancing_loss_func((logits,), config.num_local_experts, config.num_experts_per_tok)
        for logits in router_logits
    ]
    return torch.stack(losses).mean()


def training_losses(model: MixtralForCausalLM, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    output = model(input_ids=batch, output_router_logits=True)
    logits = output.logits[:, :-1].reshape(-1, model.config.vocab_size)
    lm_loss = F.cross_entropy(logits, batch[:, 1:].reshape(-1))
    return lm_loss, per_layer_balance_loss(output.router_logits, model.config)


def train(model: MixtralForCausalLM, stream: torch.Tensor, args: argparse.Namespace) -> dict:
    gen = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    start, recent = time.time(), []
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.warmup, args.lr)
        lm_loss, aux_loss = training_losses(model, sample_batch(stream, args.batch_size, args.seq_len, gen))
        optimizer.zero_grad(set_to_none=True)
        (lm_loss + model.config.router_aux_loss_coef * aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent = (recent + [lm_loss.item()])[-50:]
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            print(
                f"step {step + 1:5d}/{args.steps}  lm loss {recent[-1]:.3f} "
                f"(avg50 {sum(recent) / len(recent):.3f})"
                f"  balance {aux_loss.item():.3f}  lr {optimizer.param_groups[0]['lr']:.2e}"
                f"  {time.time() - start:5.0f}s",
                flush=True,
            )
    return {"seconds": round(time.time() - start, 1), "final_train_loss": sum(recent) / len(recent)}


# ----------------------------------------------------------------------- evaluation


def eval_windows(stream: torch.Tensor, seq_len: int, max_windows: int) -> torch.Tensor:
    count = min(max_windows, len(stream) // seq_len)
    return stream[: count * seq_len].view(count, seq_len)


def unigram_loss(train_stream: torch.Tensor, windows: torch.Tensor) -> float:
    """Cross-entropy of add-one smoothed train-split token frequencies on held-out targets."""
    counts = torch.bincount(train_stream, minlength=VOCAB_SIZE).double() + 1.0
    log_probs = (counts / counts.sum()).log()
    return -log_probs[windows[:, 1:].reshape(-1)].mean().item()


def router_batch_stats(
    router_logits: tuple[torch.Tensor, ...], config: MixtralConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer: top-k assignment counts per expert [L, E] and summed top-k router mass [L]."""
    counts, top_mass = [], []
    for logits in router_logits:
        top = logits.float().softmax(-1).topk(config.num_experts_per_tok, dim=-1)
        counts.append(torch.bincount(top.indices.reshape(-1), minlength=config.num_local_experts))
        top_mass.append(top.values.sum())
    return torch.stack(counts).double(), torch.stack(top_mass).double()


@torch.no_grad()
def evaluate(model: MixtralForCausalLM, windows: torch.Tensor, batch_size: int = 16) -> dict:
    """Held-out loss, mean top-1 next-token probability and per-layer router statistics."""
    model.eval()
    cfg = model.config
    total_loss, total_top1, total_tokens = 0.0, 0.0, 0
    expert_counts = torch.zeros(cfg.num_hidden_layers, cfg.num_local_experts, dtype=torch.double)
    router_mass = torch.zeros(cfg.num_hidden_layers, dtype=torch.double)
    for batch in windows.split(batch_size):
        output = model(input_ids=batch, output_router_logits=True)
        logits = output.logits[:, :-1].float().reshape(-1, cfg.vocab_size)
        targets = batch[:, 1:].reshape(-1)
        total_loss += F.cross_entropy(logits, targets, reduction="sum").item()
        total_top1 += logits.softmax(-1).max(-1).values.sum().item()
        total_tokens += targets.numel()
        counts, mass = router_batch_stats(output.router_logits, cfg)
        expert_counts += counts
        router_mass += mass
    shares = expert_counts / expert_counts.sum(-1, keepdim=True)
    return {
        "loss": total_loss / total_tokens,
        "mean_top1_prob": total_top1 / total_tokens,
        "expert_share_per_layer": [[round(v, 4) for v in row] for row in shares.tolist()],
        "router_topk_mass_per_layer": [round(v, 4) for v in (router_mass / windows.numel()).tolist()],
    }


def router_summary(shares: list[list[float]]) -> list[dict]:
    """Min/max expert share and normalized entropy of the share distribution, per layer."""
    summary = []
    for row in shares:
        probs = torch.tensor(row).clamp_min(1e-12)
        entropy = -(probs * probs.log()).sum().item() / math.log(len(row))
        summary.append({"min": min(row), "max": max(row), "normalized_entropy": round(entropy, 4)})
    return summary


# --------------------------------------------------------------------------- saving


def save_checkpoint(model: MixtralForCausalLM, out: Path) -> list[str]:
    """Save bf16 safetensors + generation config; return the tensor names written."""
    model.config.output_router_logits = False
    model.config.use_cache = True
    model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID, do_sample=False, max_new_tokens=64
    )
    model.save_pretrained(out, safe_serialization=True)
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        return sorted(handle.keys())


def greedy_samples(model: MixtralForCausalLM, tokenizer: Tokenizer, new_tokens: int = 40) -> dict:
    samples = {}
    for prompt in GENERATION_PROMPTS:
        input_ids = torch.tensor([tokenizer.encode(prompt).ids])
        output = model.generate(input_ids, max_new_tokens=new_tokens, do_sample=False)
        samples[prompt] = tokenizer.decode(output[0].tolist(), skip_special_tokens=True)
    return samples


def directory_report(out: Path) -> dict:
    return {path.name: path.stat().st_size for path in sorted(out.iterdir()) if path.is_file()}


# ----------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("mixbuild/fixtures/tiny-code"))
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--corpus-bytes", type=int, default=6_000_000)
    parser.add_argument("--heldout-fraction", type=float, default=0.05)
    parser.add_argument("--eval-windows", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=50)
    return parser.parse_args()


def prepare_data(args: argparse.Namespace) -> Data:
    corpus = load_corpus(args.corpus_bytes, args.heldout_fraction)
    print(f"corpus: {json.dumps(corpus.description)}", flush=True)
    tokenizer = train_tokenizer(corpus.train)
    save_tokenizer(tokenizer, args.out)
    train_stream = encode_stream(tokenizer, corpus.train)
    windows = eval_windows(encode_stream(tokenizer, corpus.heldout), args.seq_len, args.eval_windows)
    corpus.description.update(train_tokens=len(train_stream), heldout_eval_tokens=windows[:, 1:].numel())
    baseline = unigram_loss(train_stream, windows)
    print(f"train tokens {len(train_stream)}, unigram held-out loss {baseline:.3f}", flush=True)
    return Data(tokenizer, train_stream, windows, baseline, corpus.description)


def build_log(args: argparse.Namespace, data: Data, stats: dict, heldout: dict, reloaded: dict,
              samples: dict) -> dict:
    shares = reloaded["expert_share_per_layer"]
    return {
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "peak_lr": args.lr,
        "seconds": stats["seconds"],
        "final_train_loss": round(stats["final_train_loss"], 4),
        "heldout_loss": round(heldout["loss"], 4),
        "unigram_heldout_loss": round(data.unigram_loss, 4),
        "heldout_loss_bf16_reloaded": round(reloaded["loss"], 4),
        "mean_top1_prob": round(reloaded["mean_top1_prob"], 4),
        "router_share_definition": "per layer, fraction of held-out top-2 routing assignments per expert",
        "router_expert_share_per_layer": shares,
        "router_summary": router_summary(shares),
        "router_topk_mass_definition": "per layer, mean router probability on the 2 chosen experts"
        " (exactly uniform: 0.25)",
        "router_topk_mass_per_layer": reloaded["router_topk_mass_per_layer"],
        "greedy_samples": samples,
        "corpus": data.corpus,
        "versions": {"torch": torch.__version__, "transformers": sys.modules["transformers"].__version__},
        "command": shlex.join(["python", "scripts/train_fixture.py", *sys.argv[1:]]),
    }


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    args.out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args)

    model = MixtralForCausalLM(build_config())
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}", flush=True)
    stats = train(model, data.train_stream, args)
    heldout = evaluate(model, data.eval_windows)
    print(f"held-out loss {heldout['loss']:.3f} vs unigram {data.unigram_loss:.3f}", flush=True)

    tensor_names = save_checkpoint(model, args.out)
    print("on-disk tensors (layer 0):", *[n for n in tensor_names if ".layers.0." in n], sep="\n  ")
    reloaded = MixtralForCausalLM.from_pretrained(args.out, dtype=torch.float32)
    reloaded_eval = evaluate(reloaded, data.eval_windows)
    samples = greedy_samples(reloaded, data.tokenizer)
    for prompt, text in samples.items():
        print(f"--- greedy from {prompt!r}:\n{text}")

    log = build_log(args, data, stats, heldout, reloaded_eval, samples)
    (args.out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    keys = ("heldout_loss", "unigram_heldout_loss", "heldout_loss_bf16_reloaded")
    print(json.dumps({k: log[k] for k in keys}))
    print("files:", json.dumps(directory_report(args.out)))


if __name__ == "__main__":
    main()
