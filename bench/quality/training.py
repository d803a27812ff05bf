"""Contrastive pre-training of the tiny CLIP and per-task fine-tuning of its image tower."""
import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from bench.quality.tasks import TaskData
from engine.data import preprocess_images
from engine.heads import get_tokenizer, image_logits

# Generic caption forms seen in pre-training, beside each task's own (Phrasing.captions); the
# zero-shot templates overlap with them only in part, as web captions and prompt templates do.
CAPTION_TEMPLATES = [
    "{c}",
    "a photo of a {c}.",
    "a picture of the {c}.",
    "this is a {c}.",
    "an example of a {c}.",
    "a small image of a {c}.",
    "a blurry photo of the {c}.",
]


def _cosine_lr(step: int, steps: int, peak: float, warmup_fraction: float = 0.05) -> float:
    warmup = max(1, int(steps * warmup_fraction))
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW that decays only matrices, not gains, biases or scalars."""
    decayed = [p for p in params if p.ndim >= 2]
    plain = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decayed, "weight_decay": weight_decay},
                              {"params": plain, "weight_decay": 0.0}], lr=lr)


def random_shift(pixels: torch.Tensor, max_shift: int, generator: np.random.Generator) -> torch.Tensor:
    """Translate each image by up to max_shift pixels (edges replicated): label-preserving for every task."""
    if max_shift == 0:
        return pixels
    size = pixels.shape[-1]
    padded = F.pad(pixels, (max_shift,) * 4, mode="replicate")
    offsets = generator.integers(0, 2 * max_shift + 1, (len(pixels), 2))
    crops = [image[:, top:top + size, left:left + size] for image, (top, left) in zip(padded, offsets, strict=True)]
    return torch.stack(crops)


def _ssl_view(pixels: torch.Tensor, generator: np.random.Generator) -> torch.Tensor:
    """A SimCLR-style view that keeps every task's label: a random crop of 60-100% of the side resized back
    (one batched affine resampling) and pixel noise; no flips or colour changes, since orientation and hue
    are labels here."""
    n = len(pixels)
    scale = torch.from_numpy(generator.uniform(0.6, 1.0, n).astype(np.float32))
    shift = torch.from_numpy(generator.uniform(-1.0, 1.0, (n, 2)).astype(np.float32)) * (1 - scale)[:, None]
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = scale, scale, shift
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    views = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return views + 0.1 * torch.from_numpy(generator.standard_normal(views.shape).astype(np.float32))


def _nt_xent(first: torch.Tensor, second: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SimCLR's loss over two batches of normalised embeddings of the same images."""
    embeddings = torch.cat([first, second])
    similarity = embeddings @ embeddings.T / temperature
    similarity.fill_diagonal_(float("-inf"))
    n = len(first)
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(similarity, targets)


def pretrain_contrastive(model: torch.nn.Module, tasks: list[TaskData], steps: int, batch_size: int, lr: float,
                         seed: int, max_shift: int = 0, captioned: int | None = None, ssl_weight: float = 0.0,
                         ssl_batch: int = 128) -> list[float]:
    """CLIP-style training on (image, caption) pairs from the tasks' pretrain splits, all towers.

    Each batch mixes the tasks uniformly; a caption is a random form (generic or the task's own)
    around the class name. Several images of a batch share a class, so the loss treats every
    caption of the image's class as its positive (image->text over the batch's distinct captions,
    text->image over all images of that class). Returns the loss per step.

    With `captioned`, only the first that many pretrain images of each task have captions; with
    ssl_weight > 0, every pretrain image (captioned or not) also feeds SimCLR's image-image loss on two
    label-preserving views (SLIP, Mu et al. 2022): the image tower learns features from many images
    while its alignment with class names comes from few, as a web-trained CLIP's does for tasks the web
    rarely captions.
    """
    generator = np.random.default_rng(seed)
    torch.manual_seed(seed)
    pixels, global_labels, task_of_image, offsets = [], [], [], [0]
    captions: list[list[str]] = []  # per global class, every caption it can get
    unlabelled = []
    for index, task in enumerate(tasks):
        images, labels = task.splits["pretrain"]
        if ssl_weight > 0:
            unlabelled.append(preprocess_images(images, model))
        images, labels = images[:captioned], labels[:captioned]
        pixels.append(preprocess_images(images, model))
        global_labels.append(labels + offsets[-1])
        task_of_image.append(np.full(len(labels), index))
        forms = CAPTION_TEMPLATES + task.phrasing.captions
        captions += [[form.format(c=name) for form in forms] for name in task.class_names]
        offsets.append(offsets[-1] + len(task.class_names))
    pixels = torch.cat(pixels)
    unlabelled = torch.cat(unlabelled) if unlabelled else None
    global_labels = np.concatenate(global_labels)
    task_of_image = np.concatenate(task_of_image)
    # uniform over tasks, then uniform within a task
    weights = 1.0 / np.bincount(task_of_image)[task_of_image]
    weights /= weights.sum()
    tokens = get_tokenizer(model)([caption for options in captions for caption in options])
    first_caption = np.cumsum([0] + [len(options) for options in captions])

    model.train()
    # Token embeddings keep their random init: rows are distinct already, and a dense AdamW
    # update of all 49408 rows would dominate the step time.
    model.token_embedding.weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _adamw(params, lr, weight_decay=0.05)
    losses = []
    for step in tqdm(range(steps), desc="pre-train CLIP", leave=False):
        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(step, steps, lr)
        batch = generator.choice(len(pixels), size=batch_size, p=weights)
        classes, targets = np.unique(global_labels[batch], return_inverse=True)
        options = first_caption[classes + 1] - first_caption[classes]
        chosen = first_caption[classes] + (generator.random(len(classes)) * options).astype(int)
        text = model.encode_text(tokens[torch.from_numpy(chosen)], normalize=True)
        image = model.encode_image(random_shift(pixels[batch], max_shift, generator), normalize=True)
        logits = model.logit_scale.exp() * image @ text.T
        targets = torch.from_numpy(targets)
        same_class = F.one_hot(targets, len(classes)).T.float()
        image_loss = F.cross_entropy(logits, targets)
        text_loss = -(F.log_softmax(logits.T, dim=1) * same_class).sum(1).div(same_class.sum(1)).mean()
        loss = (image_loss + text_loss) / 2
        if unlabelled is not None:
            chosen = torch.from_numpy(generator.choice(len(unlabelled), size=ssl_batch, replace=False))
            views = [model.encode_image(_ssl_view(unlabelled[chosen], generator), normalize=True)
                     for _ in range(2)]
            loss = loss + ssl_weight * _nt_xent(*views)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
    model.token_embedding.weight.requires_grad_(True)
    model.eval()
    return losses


def finetune_visual(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, head: torch.Tensor,
                    steps: int, batch_size: int, lr: float, weight_decay: float, seed: int, desc: str,
                    max_shift: int = 0) -> None:
    """Cross-entropy fine-tuning of visual.* in place, through the frozen zero-shot head."""
    generator = np.random.default_rng(seed)
    torch.manual_seed(seed)
    pixels = preprocess_images(images, model)
    targets = torch.as_tensor(labels, dtype=torch.long)
    visual = [p for name, p in model.named_parameters() if name.startswith("visual.")]
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("visual."))
    optimizer = _adamw(visual, lr, weight_decay)
    model.train()
    for step in tqdm(range(steps), desc=f"fine-tune {desc}", leave=False):
        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(step, steps, lr)
        batch = torch.from_numpy(generator.integers(0, len(pixels), batch_size))
        inputs = random_shift(pixels[batch], max_shift, generator)
        loss = F.cross_entropy(image_logits(model, inputs, head), targets[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
