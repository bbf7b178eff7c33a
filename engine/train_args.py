"""train.py's arguments: timm train.py names, so the paper's YAML configs and command lines work unchanged."""
import argparse
import sys

from timm.utils import ParseKwargs

from distillers import add_distiller_arguments
from kdcore.precision import AMP_DTYPES, TEACHER_PRECISIONS, default_device
from kdcore.sources import add_input_spec_arguments

from .datasets import dataset_names
from .plugins import add_import_argument
from .preemption import DEFAULT_SIGNALS as DEFAULT_STOP_SIGNALS

DEFAULT_DIST_TIMEOUT_S = 1800


class OneLineErrorParser(argparse.ArgumentParser):
    """A parser whose errors are one `error:` line (exit 2) instead of the whole usage text before it."""

    def error(self, message):
        print(f"error: {message} (`{self.prog} --help` lists the arguments)", file=sys.stderr, flush=True)
        sys.exit(2)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


def add_data_arguments(p):
    """Dataset and input-pipeline flags shared by train.py and validate.py."""
    g = p.add_argument_group("data")
    g.add_argument("data_dir", nargs="?", default="", help="dataset folder")
    g.add_argument("--dataset", default="", choices=("",) + dataset_names(),
                   help="dataset kind (registered in engine/datasets/, or by an --import module); inferred from the "
                        "folder when omitted")
    g.add_argument("--dataset-download", action="store_true", help="download CIFAR-100 if missing")
    g.add_argument("--synthetic-train-size", type=int, default=None, help="--dataset synthetic: images (512)")
    g.add_argument("--synthetic-val-size", type=int, default=None, help="--dataset synthetic: images (128)")
    g.add_argument("--synthetic-seed", type=int, default=None, help="--dataset synthetic: generator seed (0)")
    g.add_argument("--train-subset", type=int, default=None, metavar="N",
                   help="train on a fixed class-balanced subset of N training images (the same for every --seed); "
                        "0: the whole training set")
    g.add_argument("--train-subset-seed", type=int, default=0, help="which subset --train-subset picks")
    g.add_argument("--holdout", type=int, default=None, metavar="N",
                   help="hold a fixed class-balanced split of N training images out of training and evaluate on it "
                        "(the same split for every run; --train-subset draws from the rest); the dataset's own "
                        "evaluation images are then left for validate.py without --holdout")
    g.add_argument("--img-size", type=int, default=None, help="input size (default: the student's)")
    g.add_argument("--input-size", type=int, nargs=3, default=None, metavar="N")
    g.add_argument("--crop-pct", type=float, default=None)
    g.add_argument("--mean", type=float, nargs="+", default=None, help="override the dataset's mean")
    g.add_argument("--std", type=float, nargs="+", default=None, help="override the dataset's std")
    g.add_argument("--interpolation", default="")
    g.add_argument("-b", "--batch-size", type=int, default=128, help="per-process batch size")
    g.add_argument("-vb", "--validation-batch-size", type=int, default=None)
    g.add_argument("-j", "--workers", type=int, default=4)


def build_train_parser(distiller_registry):
    p = OneLineErrorParser(
        prog="train.py", description="Cross-architecture knowledge distillation (RSD, KD, ...) on timm models.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-c", "--config", default="", help="YAML file of argument defaults (keys are argument names)")
    add_import_argument(p)

    add_data_arguments(p)

    g = p.add_argument_group("student model")
    g.add_argument("--model", default="resnet18")
    g.add_argument("--pretrained", action="store_true", help="start the student from timm's pretrained weights")
    g.add_argument("--pretrained-path", default="", metavar="FILE",
                   help="start the student from this file as timm's pretrained weights: position embeddings and "
                        "windows are resized to the input size, a head of another class count is re-initialised")
    g.add_argument("--initial-checkpoint", default="", help="start the student from these weights")
    g.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE",
                   help="extra keyword arguments of the student's timm constructor, e.g. depth=6 embed_dim=384 "
                        "(values read as Python literals, else as strings)")
    g.add_argument("--num-classes", type=int, default=None, help="default: the dataset's")
    g.add_argument("--drop", type=float, default=0.0, help="dropout rate")
    g.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate")
    g.add_argument("--drop-block", type=float, default=None)
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm for the student (GPU, distributed)")
    g.add_argument("--channels-last", action="store_true")

    g = p.add_argument_group("teacher")
    g.add_argument("--teacher", default="", help="timm model name of the frozen teacher ('' = none)")
    g.add_argument("--teacher-pretrained", default="", help="teacher checkpoint (state dict or training file)")
    g.add_argument("--use-ema-teacher", action="store_true", help="take the EMA weights from the teacher file")
    g.add_argument("--teacher-precision", default="auto", choices=TEACHER_PRECISIONS,
                   help="teacher forward precision (autocast); auto = bf16 where the device computes it natively "
                        "(GPUs, CPUs with AMX or AVX512-BF16), else fp32")
    add_input_spec_arguments(g, "--teacher", "the teacher")
    g.add_argument("--no-eval-teacher", action="store_true", help="skip scoring the teacher before training")
    g.add_argument("--teacher-cache", default="", metavar="DIR",
                   help="read the teacher's outputs from a cache of augmented views (tools/build_cache.py --views "
                   "augmented, built with this run's config and flags) instead of running it; --teacher and "
                   "--teacher-pretrained are then optional, and checked against the cache when given")
    g.add_argument("--check-cache", type=int, default=0, metavar="N",
                   help="with --teacher-cache: recompute N random entries with the live teacher before training "
                   "(needs --teacher-pretrained)")

    add_distiller_arguments(p, distiller_registry)

    g = p.add_argument_group("optimizer")
    g.add_argument("--opt", default="sgd")
    g.add_argument("--opt-eps", type=float, default=None)
    g.add_argument("--opt-betas", type=float, nargs="+", default=None)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=2e-5)
    g.add_argument("--clip-grad", type=float, default=None, help="gradient clipping threshold")
    g.add_argument("--clip-mode", default="norm", choices=("norm", "value", "agc"))
    g.add_argument("--layer-decay", type=float, default=None)
    g.add_argument("--grad-accum-steps", type=int, default=1, metavar="K",
                   help="accumulate the gradients of K batches of --batch-size per optimizer update")

    g = p.add_argument_group("learning-rate schedule")
    g.add_argument("--sched", default="cosine")
    g.add_argument("--sched-on-updates", action="store_true", help="update the lr every step, not every epoch")
    g.add_argument("--lr", type=float, default=None,
                   help="learning rate; when not given: 0.05, or scaled from --lr-base if that is given")
    g.add_argument("--lr-base", type=float, default=None,
                   help="learning rate for a global batch of --lr-base-size, scaled to the run's global batch "
                        "(per-process batch x processes x accumulation steps); used when --lr is not given")
    g.add_argument("--lr-base-size", type=int, default=256, help="the global batch --lr-base is meant for")
    g.add_argument("--lr-base-scale", default="", choices=("", "linear", "sqrt"),
                   help="how --lr-base scales with the batch ratio; '' = sqrt for Ada*/LAMB optimizers, else linear")
    g.add_argument("--lr-noise", type=float, nargs="+", default=None)
    g.add_argument("--lr-k-decay", type=float, default=1.0)
    g.add_argument("--warmup-lr", type=float, default=1e-5)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--epochs", type=int, default=300)
    g.add_argument("--decay-epochs", type=float, default=100)
    g.add_argument("--decay-milestones", type=int, nargs="+", default=[90, 180, 270])
    g.add_argument("--decay-rate", "--dr", type=float, default=0.1)
    g.add_argument("--warmup-epochs", type=int, default=3)
    g.add_argument("--warmup-prefix", action="store_true")
    g.add_argument("--cooldown-epochs", type=int, default=0)
    g.add_argument("--patience-epochs", type=int, default=10, help="--sched plateau: epochs without improvement "
                   "of --eval-metric before the lr decays by --decay-rate")

    g = p.add_argument_group("augmentation and regularisation")
    g.add_argument("--no-aug", action="store_true", help="no training augmentation (resize and crop only)")
    g.add_argument("--scale", type=float, nargs=2, default=[0.08, 1.0], help="random-resized-crop scale")
    g.add_argument("--ratio", type=float, nargs=2, default=[3. / 4., 4. / 3.])
    g.add_argument("--hflip", type=float, default=0.5)
    g.add_argument("--vflip", type=float, default=0.0)
    g.add_argument("--color-jitter", type=float, default=0.4)
    g.add_argument("--aa", default=None, help="AutoAugment/RandAugment policy, e.g. rand-m9-mstd0.5-inc1")
    g.add_argument("--aug-repeats", type=int, default=0, help="repeated augmentation count (0 = off)")
    g.add_argument("--reprob", type=float, default=0.0, help="random erasing probability")
    g.add_argument("--remode", default="pixel")
    g.add_argument("--recount", type=int, default=1)
    g.add_argument("--mixup", type=float, default=0.0)
    g.add_argument("--cutmix", type=float, default=0.0)
    g.add_argument("--cutmix-minmax", type=float, nargs="+", default=None)
    g.add_argument("--mixup-prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", type=float, default=0.5)
    g.add_argument("--mixup-mode", default="batch", help="--mixup-pairing batch: one lambda per batch (batch), "
                   "per pair (pair) or per image (elem), as timm")
    g.add_argument("--aug-seed", type=int, default=None, help="the seed of every training view (default: --seed); "
                   "runs that differ in --seed only can then share one teacher cache")
    g.add_argument("--mixup-pairing", choices=("batch", "sample"), default="batch",
                   help="batch: timm's Mixup, each image mixed with its mirror in the process's batch (the paper's "
                   "recipe); sample: each image's partner, lambda, mode and box drawn from (seed, epoch, index), "
                   "the same for any process count and batch size (the partner's view is decoded a second time)")
    g.add_argument("--mixup-off-epoch", type=int, default=0, metavar="N",
                   help="no mixup/cutmix from epoch N on (labels stay smoothed); 0 = mix every epoch")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--bce-loss", action="store_true", help="binary cross-entropy as the ground-truth loss")
    g.add_argument("--bce-target-thresh", type=float, default=None)

    g = p.add_argument_group("EMA")
    g.add_argument("--model-ema", action="store_true", help="keep EMA copies of the student")
    g.add_argument("--model-ema-decay", type=float, nargs="+", default=[0.9998], help="one EMA per decay")
    g.add_argument("--model-ema-warmup", action="store_true",
                   help="timm's EMA warmup: decay min(--model-ema-decay, 1 - n^(-2/3)) at update n")

    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--device", default=default_device())
    g.add_argument("--amp", action="store_true", help="mixed precision for the student step")
    g.add_argument("--amp-dtype", default="bfloat16", choices=tuple(AMP_DTYPES))
    g.add_argument("--compile", action="store_true", help="torch.compile the student step and the teacher")
    g.add_argument("--torchcompile-mode", default=None, choices=COMPILE_MODES,
                   help="torch.compile mode of the student step (needs --compile)")
    g.add_argument("--log-interval", type=int, default=50)
    g.add_argument("--output", default="output/train", help="parent folder of run folders")
    g.add_argument("--experiment", default="", help="run folder name (default: time-distiller-model-teacher)")
    g.add_argument("--resume", default="", metavar="PATH|auto",
                   help="continue the run of this checkpoint (in its own folder); auto: from the newest loadable "
                        "checkpoint of --output/--experiment, or a fresh start when it has none")
    g.add_argument("--no-resume-opt", action="store_true",
                   help="with --resume: restore the weights (student, EMAs, distiller modules) and the position "
                        "in the run, but start the optimizer, lr scheduler and AMP scaler afresh")
    g.add_argument("--recovery-interval", type=int, default=0, metavar="N",
                   help="also checkpoint every N optimizer updates (recovery-<epoch>-<step>.pth.tar, which "
                        "--resume continues mid-epoch; 0 = never)")
    g.add_argument("--checkpoint-hist", type=int, default=10, help="recovery checkpoints kept (the latest)")
    g.add_argument("--eval-metric", default="top1", help="top1, top5 or loss (ema_top1 ... with --model-ema); "
                   "picks best.pth.tar and drives --sched plateau")
    g.add_argument("--dist-timeout", type=float, default=DEFAULT_DIST_TIMEOUT_S, metavar="SECONDS",
                   help="how long a collective waits for the other processes before every process exits with code 3 "
                        "(a peer that hangs); above the longest rank-0-only section, the checkpoint writes")
    g.add_argument("--stop-signals", nargs="+", default=list(DEFAULT_STOP_SIGNALS), metavar="SIGNAL",
                   help="signals that stop the run at the next optimizer update with a recovery checkpoint "
                        "(exit code 75; requeue with --resume auto); a second one exits at once")
    g.add_argument("--dist-bn", default="reduce", choices=("reduce", "broadcast", ""),
                   help="make BatchNorm statistics identical on every process before evaluating and saving: "
                        "average them (reduce) or take rank 0's (broadcast); '' leaves them per process")
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p
