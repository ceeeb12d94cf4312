"""The zoo: real architectures that no one here wrote, built from configs with random initialisation (no
downloads), as ``check-model`` factories, at two sizes: ``tiny`` (CPU, CI) and ``base`` (GPU, realistic).

========  =============  ==========================  ==========================================
name      library        task                        base size
========  =============  ==========================  ==========================================
gpt2      transformers   causal LM                   GPT-2 124M (768 wide, 12 layers)
llama     transformers   causal LM                   LLaMA ~134M (768 wide, 12 layers, 32k vocab)
bert      transformers   masked LM                   BERT-base (110M)
t5        transformers   encoder-decoder             T5-small (60M)
vit       timm           image classification        ViT-B/16 at 224x224
convnext  timm           image classification        ConvNeXt-T at 224x224
resnet50  torchvision    image classification        ResNet-50 (BatchNorm) at 224x224
========  =============  ==========================  ==========================================

The failure regimes (:mod:`harness.models.zoo_regimes`) are variants of these at the tiny size. Data
comes from :mod:`harness.models.zoo_data`. A model whose library is missing (or fails to import) is
``unsupported`` with the install line, never an ImportError::

    python -m harness check-model zoo:gpt2            # tiny
    python -m harness check-model zoo:llama@base --device cuda
    python -m harness zoo --model gpt2 --model bert --steps 8
"""
from __future__ import annotations

import difflib
import functools
import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import zoo_data

__all__ = ["ZooModel", "ZOO", "SIZES", "LIBRARIES", "library_missing", "unsupported", "factory", "names",
           "register", "parse_target", "get", "gpt2_config", "llama_config", "causal_lm", "image_classifier"]

SIZES = ("tiny", "base")
#: The zoo's libraries (``pip install 'mp-harness[zoo]'``), with the ranges pyproject's ``zoo`` extra pins.
LIBRARIES = {"transformers": "transformers>=4.51,<6", "timm": "timm>=1.0,<2", "torchvision": "torchvision>=0.19"}
INSTALL = "pip install 'mp-harness[zoo]'"
#: Why a convolutional model does not run at its base size on a CPU.
CPU_CONV = ("CPU autocast runs FP16/BF16 convolutions 10-40x slower than FP32, so a base-size convolutional "
            "model takes minutes per strategy on a CPU; run it on a GPU, or with --size tiny")


@dataclass(frozen=True)
class ZooModel:
    """One zoo entry: ``build(size, seed)`` returns a check-model factory dict."""

    name: str
    library: str
    task: str
    description: str
    build: Callable[[str, int], dict]
    sizes: tuple[str, ...] = SIZES
    regime: str = ""  # the failure regime the variant shows (empty: a healthy model)
    conv: bool = False  # convolutions: slow under CPU autocast (see CPU_CONV)


ZOO: dict[str, ZooModel] = {}


def register(model: ZooModel) -> ZooModel:
    """Add ``model`` to :data:`ZOO`; a duplicate name raises."""
    if model.name in ZOO:
        raise ValueError(f"zoo model {model.name!r} is registered twice")
    ZOO[model.name] = model
    return model


def names() -> list[str]:
    """Every zoo model, the healthy ones first, then the regimes (:mod:`harness.models.zoo_regimes`)."""
    _load_regimes()
    return [n for n in ZOO if not ZOO[n].regime] + [n for n in ZOO if ZOO[n].regime]


@functools.lru_cache(maxsize=None)
def library_missing(lib: str) -> str | None:
    """Why ``lib`` cannot build a zoo model here (not installed, or its import fails), with the install
    line; None when it imports. The import is tried: a package can be installed and still fail to import
    (a torchvision built for CUDA on a CPU-only machine)."""
    try:
        importlib.import_module(lib)
    except ModuleNotFoundError as exc:
        if exc.name != lib and not (exc.name or "").startswith(lib + "."):  # its own dependency is missing
            return f"{lib} is installed but cannot import {exc.name}: {INSTALL} (or pip install '{LIBRARIES[lib]}')"
        return f"{lib} is not installed: {INSTALL} (or pip install '{LIBRARIES[lib]}')"
    except Exception as exc:  # noqa: BLE001  (a broken build raises anything: OSError, RuntimeError...)
        first = str(exc).splitlines()[0][:160] if str(exc) else ""
        return f"{lib} is installed but its import fails ({type(exc).__name__}: {first}): reinstall it for this torch, {INSTALL}"
    return None


def get(name: str) -> ZooModel:
    """The entry ``name``; ValueError naming the close matches for an unknown one."""
    _load_regimes()
    if name not in ZOO:
        close = difflib.get_close_matches(name, list(ZOO), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown zoo model {name!r}{hint} (models: {', '.join(names())})")
    return ZOO[name]


def unsupported(name: str, size: str, device: torch.device | str) -> str | None:
    """Why ``name`` at ``size`` cannot run on ``device`` here, or None."""
    m = get(name)
    if size not in m.sizes:
        return f"{name} has no {size!r} size (sizes: {', '.join(m.sizes)})"
    missing = library_missing(m.library)
    if missing:
        return missing
    if m.conv and size != "tiny" and torch.device(device).type == "cpu":
        return CPU_CONV
    return None


def parse_target(text: str) -> tuple[str, str]:
    """``NAME`` or ``NAME@SIZE`` -> (name, size); ValueError for an unknown size."""
    name, _, size = text.partition("@")
    size = size or "tiny"
    if size not in SIZES:
        raise ValueError(f"zoo:{text}: unknown size {size!r}; sizes: {', '.join(SIZES)} (e.g. zoo:{name}@base)")
    return name, size


def factory(name: str, size: str = "tiny", seed: int | None = None) -> dict:
    """The check-model factory dict of zoo model ``name`` at ``size``: the model (random init from ``seed``;
    None: the global RNG's seed, which ``check-model --seed`` sets) and its data. ValueError when the name
    or size is unknown, or the model's library is missing here (with the install line)."""
    m = get(name)
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; sizes: {', '.join(SIZES)}")
    missing = library_missing(m.library) or (None if size in m.sizes else f"{name} has no {size!r} size")
    if missing:
        raise ValueError(f"zoo model {name}: unsupported here: {missing}")
    seed = torch.initial_seed() % 2**31 if seed is None else seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return m.build(size, seed)


def __getattr__(attr: str) -> Callable[[], dict]:
    """``harness.models.zoo:NAME[@SIZE]`` as a factory: what ``check-model zoo:NAME`` imports."""
    name, _, size = attr.partition("@")
    _load_regimes()
    if name not in ZOO:  # any other attribute is missing, as for a plain module
        raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
    name, size = parse_target(attr)
    fac = functools.partial(factory, name, size)
    fac.__qualname__ = f"zoo-{name}-{size}"  # type: ignore[attr-defined]
    return fac


def _load_regimes() -> None:
    from . import zoo_regimes  # noqa: F401  (registers the variants)


# -- builders -------------------------------------------------------------------------------------------------
#: Language models: (width, layers, heads, vocab, sequence length, batch, learning rate) per size.
LM = {"tiny": dict(width=64, layers=2, heads=4, vocab=128, seq=32, batch=8, lr=3e-3),
      "base": dict(width=768, layers=12, heads=12, vocab=None, seq=256, batch=8, lr=3e-4)}
#: Image models: (image size, classes, batch, learning rate) per size.
IMAGE = {"tiny": dict(image=32, classes=10, batch=8, lr=1e-3), "base": dict(image=224, classes=10, batch=16, lr=3e-4)}


def adamw(lr: float, weight_decay: float = 0.0) -> Callable[[list], torch.optim.Optimizer]:
    """The zoo's optimizer: AdamW, no weight decay unless asked (the output-logit regime needs none)."""
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def causal_lm(model: torch.nn.Module, vocab: int, seq: int, batch: int, seed: int, lr: float,
              loss_extra: Callable[[Any], torch.Tensor] | None = None) -> dict:
    """A factory dict for a Hugging Face causal LM on Markov-chain tokens (``labels=input_ids``: the model
    shifts them). ``loss_extra(output)`` is added to the loss (the z-loss regime)."""
    chain = zoo_data.MarkovChain(vocab, seed)

    def loss(m: torch.nn.Module, b: tuple) -> torch.Tensor:
        out = m(input_ids=b[0], labels=b[0])
        note_logits(m, out.logits)
        return out.loss if loss_extra is None else out.loss + loss_extra(out)
    return {"model": model, "batch": lambda step: (chain.tokens(batch, seq, seed, step),), "loss": loss,
            "optimizer": adamw(lr)}


def note_logits(model: torch.nn.Module, logits: torch.Tensor) -> None:
    """Keep the largest |output logit| and the mean |log Z| (the log of the softmax's normaliser, what a
    z-loss holds near 0) of this forward pass on the model, for a regime's ``observe``."""
    if hasattr(model, "harness_output_logit_max"):
        with torch.no_grad():
            z = logits.detach().float()
            model.harness_output_logit_max = float(z.abs().max())
            model.harness_log_z = float(torch.logsumexp(z, dim=-1).abs().mean())


def _hf_common() -> dict:
    # dropout 0: masks drawn in FP16 and FP32 kernels can differ, and the check would measure the masks
    return {"attn_implementation": "sdpa"}


def gpt2_config(size: str, **over: Any) -> Any:
    """A GPT-2 config at ``size`` (base: GPT-2 124M), dropout off; ``over`` overrides fields."""
    import transformers
    c = LM[size]
    return transformers.GPT2Config(vocab_size=c["vocab"] or 50257, n_positions=max(c["seq"], 64), n_embd=c["width"],
                                   n_layer=c["layers"], n_head=c["heads"], resid_pdrop=0.0, embd_pdrop=0.0,
                                   attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **{**_hf_common(), **over})


def _gpt2(size: str, seed: int) -> dict:
    import transformers
    c, cfg = LM[size], gpt2_config(size)
    return causal_lm(transformers.GPT2LMHeadModel(cfg), cfg.vocab_size, c["seq"], c["batch"], seed, c["lr"])


def llama_config(size: str, cls: str = "LlamaConfig", **over: Any) -> Any:
    """A LLaMA-shaped config (``cls`` may name another class of the same shape, e.g. Qwen3's)."""
    import transformers
    c = LM[size]
    return getattr(transformers, cls)(
        vocab_size=c["vocab"] or 32000, hidden_size=c["width"], intermediate_size=c["width"] * 8 // 3,
        num_hidden_layers=c["layers"], num_attention_heads=c["heads"], num_key_value_heads=c["heads"],
        max_position_embeddings=max(c["seq"], 64), attention_dropout=0.0, tie_word_embeddings=False,
        **{**_hf_common(), **over})


def _llama(size: str, seed: int) -> dict:
    import transformers
    c = LM[size]
    cfg = llama_config(size)
    return causal_lm(transformers.LlamaForCausalLM(cfg), cfg.vocab_size, c["seq"], c["batch"], seed, c["lr"])


def _bert(size: str, seed: int) -> dict:
    import transformers
    c = LM[size]
    vocab = c["vocab"] or 30522
    cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=c["width"], num_hidden_layers=c["layers"],
                                  num_attention_heads=c["heads"], intermediate_size=4 * c["width"],
                                  max_position_embeddings=max(c["seq"], 64), hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, **_hf_common())
    seq = c["seq"] // 2 if size == "base" else c["seq"]  # BERT-base pre-trains at 128 tokens
    # the chain uses a quarter of the ids (the last one is [MASK]): the masked ids' marginal is learnt within
    # a few updates, their context (the chain's table) later
    chain = zoo_data.MarkovChain(vocab, seed, reserved=vocab // 4)

    def batch(step: int) -> tuple:
        return zoo_data.masked(chain, c["batch"], seq, seed, step, mask_id=vocab - 1)
    return {"model": transformers.BertForMaskedLM(cfg), "batch": batch,
            "loss": lambda m, b: m(input_ids=b[0], labels=b[1]).loss, "optimizer": adamw(c["lr"])}


def _t5(size: str, seed: int) -> dict:
    import transformers
    tiny = size == "tiny"
    vocab = 128 if tiny else 32128
    cfg = transformers.T5Config(vocab_size=vocab, d_model=64 if tiny else 512, d_kv=16 if tiny else 64,
                                d_ff=128 if tiny else 2048, num_layers=2 if tiny else 6, num_heads=4 if tiny else 8,
                                dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    seq, bsz, lr = (16, 8, 3e-3) if tiny else (128, 8, 3e-4)
    chain = zoo_data.MarkovChain(vocab, seed)
    return {"model": transformers.T5ForConditionalGeneration(cfg),
            "batch": lambda step: zoo_data.seq2seq(chain, bsz, seq, seed, step),
            "loss": lambda m, b: m(input_ids=b[0], labels=b[1]).loss, "optimizer": adamw(lr)}


def image_classifier(model: torch.nn.Module, size: str, seed: int) -> dict:
    """A factory dict for an image classifier on class-patterned images (:func:`zoo_data.images`)."""
    c = IMAGE[size]

    def loss(m: torch.nn.Module, b: tuple) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(m(b[0]).float(), b[1])
    return {"model": model, "batch": lambda step: zoo_data.images(c["classes"], c["batch"], c["image"], seed, step),
            "loss": loss, "optimizer": adamw(c["lr"])}


def _vit(size: str, seed: int) -> dict:
    import timm
    if size == "tiny":
        from timm.models.vision_transformer import VisionTransformer
        model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                                  num_classes=IMAGE[size]["classes"])
    else:
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=IMAGE[size]["classes"])
    return image_classifier(model, size, seed)


def _convnext(size: str, seed: int) -> dict:
    import timm
    if size == "tiny":
        from timm.models.convnext import ConvNeXt
        model = ConvNeXt(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), num_classes=IMAGE[size]["classes"])
    else:
        model = timm.create_model("convnext_tiny", pretrained=False, num_classes=IMAGE[size]["classes"])
    return image_classifier(model, size, seed)


def _resnet50(size: str, seed: int) -> dict:
    from torchvision.models import resnet
    layers = [1, 1, 1, 1] if size == "tiny" else [3, 4, 6, 3]  # ResNet-50's bottleneck counts at base
    model = resnet.ResNet(resnet.Bottleneck, layers, num_classes=IMAGE[size]["classes"])
    return image_classifier(model, size, seed)


for _m in (
    ZooModel("gpt2", "transformers", "causal LM", "Hugging Face GPT-2 (GPT2LMHeadModel)", _gpt2),
    ZooModel("llama", "transformers", "causal LM", "Hugging Face LLaMA (LlamaForCausalLM, RMSNorm, RoPE, SwiGLU)",
             _llama),
    ZooModel("bert", "transformers", "masked LM", "Hugging Face BERT (BertForMaskedLM), 15% of tokens masked", _bert),
    ZooModel("t5", "transformers", "encoder-decoder", "Hugging Face T5 (T5ForConditionalGeneration): continue "
             "the encoder's sequence", _t5),
    ZooModel("vit", "timm", "image classification", "timm VisionTransformer (ViT-B/16 at base)", _vit),
    ZooModel("convnext", "timm", "image classification", "timm ConvNeXt (ConvNeXt-T at base)", _convnext, conv=True),
    ZooModel("resnet50", "torchvision", "image classification", "torchvision ResNet with BatchNorm (ResNet-50 at "
             "base)", _resnet50, conv=True),
):
    register(_m)
