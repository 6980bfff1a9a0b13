"""Why the world's Mod-Adapter carries objects, surfaces and poses but not lighting or background: measurements.

Each subcommand prints small markdown tables (docs/results.md, "Why lighting and background"). Every draw is
seeded; torch runs on one thread unless ``--threads`` says otherwise.

    python benchmarks/world_why_lighting.py probe      # 1. is the attribute in the adapter's image tokens?
    python benchmarks/world_why_lighting.py delta      # 2a. does the adapter's Δ depend on the image (and on what)?
    python benchmarks/world_why_lighting.py learn --kinds lighting background --work-dir out/world/why-lighting
                                                       # 2b + 4. Learn Concept per image: CP, and its Δ vs the adapter's
    python benchmarks/world_why_lighting.py training   # 3. what training sees: pairs, per-kind loss, pre-training target

``learn`` reuses the Δ files it finds in ``--work-dir`` (delete them to learn again).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Dict, List, Sequence

import numpy as np
import torch

from mod_adapter.modules.world.evaluation import ABSTRACT_KINDS, eval_learn_draws
from mod_adapter.modules.world.captions import GROUPS, describe, full_caption
from mod_adapter.modules.world.pairs import CONCEPT_KINDS, concept_caption, concept_word, pairs
from mod_adapter.modules.world.scene import ATTRIBUTES, CONCEPT_ATTRIBUTES, SHAPES, Scene, render
from mod_adapter.modules.world.split import EVAL, TRAIN, scenes

ADAPTER = "world/adapter/toy_world_adapter.safetensors"
WORDS = ("lighting", "background", "pose", "surface")  # the group words, as captions.GROUPS names them


# --------------------------------------------------------------------------
# Shared loading
# --------------------------------------------------------------------------


def load_world(world: str):
    from mod_adapter.modules.flux_diffusers import load_flux_pipeline, resolve_flux_source
    from mod_adapter.modules.world.paths import check_world
    from mod_adapter.modules.world.judge import load_judge
    from mod_adapter.modules.world.methods import WorldModels

    paths = check_world(world)
    pipe = load_flux_pipeline(resolve_flux_source(paths["flux"]), torch.float32)
    return paths, WorldModels.load(paths, pipe), load_judge(paths["judge"])


def load_adapter(path: str):
    from mod_adapter.modules.checkpoint import load_adapter_checkpoint

    return load_adapter_checkpoint(path, dtype=torch.float32).adapter.eval()


@torch.no_grad()
def image_tokens(encoder, scene_list: Sequence[Scene], batch: int = 256) -> torch.Tensor:
    """Penultimate tokens (N, 65, 128) exactly as training makes them (encoder.encode of the 0..1 render, no mask)."""
    out = []
    for start in range(0, len(scene_list), batch):
        images = torch.from_numpy(np.stack([render(s) for s in scene_list[start:start + batch]])).float().div(255.0)
        out.append(encoder.encode(images).cpu())
    return torch.cat(out)


@torch.no_grad()
def adapter_deltas(adapter, models, tokens: torch.Tensor, word: str, batch: int = 256) -> torch.Tensor:
    neutral = models.text_feature(word)[None]
    out = []
    for start in range(0, tokens.shape[0], batch):
        chunk = tokens[start:start + batch]
        out.append(adapter(neutral.expand(chunk.shape[0], -1), chunk))
    return torch.cat(out)


def labels(scene_list: Sequence[Scene], name: str) -> torch.Tensor:
    values = ATTRIBUTES[name]
    return torch.tensor([values.index(getattr(s, name)) for s in scene_list])


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(x):
        if isinstance(x, float):
            return f"{x:.2f}" if abs(x) >= 0.01 or x == 0 else f"{x:.3f}"
        return str(x)

    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# 1. Linear probes
# --------------------------------------------------------------------------


def fit_probe(x_train: torch.Tensor, y_train: torch.Tensor, classes: int, weight_decay: float,
              iterations: int = 200) -> torch.nn.Linear:
    """Multinomial logistic regression (L-BFGS, L2 on the weights) on standardised features."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(x_train.shape[1], classes)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=iterations, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(x_train), y_train) + weight_decay * linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return linear


def probe_accuracy(x_train, y_train, tests: Dict[str, tuple], classes: int) -> Dict[str, float]:
    """Fit on x_train (weight decay chosen on a fifth of it held back), refit on all, accuracy on each test set."""
    mean, std = x_train.mean(0, keepdim=True), x_train.std(0, keepdim=True).clamp_min(1e-6)
    norm = lambda x: (x - mean) / std  # noqa: E731
    xt, n = norm(x_train), x_train.shape[0]
    cut = n * 4 // 5
    best, best_acc = None, -1.0
    for wd in (1e-4, 1e-3, 1e-2):
        model = fit_probe(xt[:cut], y_train[:cut], classes, wd)
        with torch.no_grad():
            acc = float((model(xt[cut:]).argmax(-1) == y_train[cut:]).float().mean())
        if acc > best_acc:
            best, best_acc = wd, acc
    model = fit_probe(xt, y_train, classes, best)
    with torch.no_grad():
        return {name: float((model(norm(x)).argmax(-1) == y).float().mean()) for name, (x, y) in tests.items()}


def cmd_probe(args) -> None:
    _, models, _ = load_world(args.world)
    started = time.perf_counter()
    train = list(scenes(args.seed, args.train, TRAIN))
    tests = {"held-out": list(scenes(args.seed + 1, args.test, EVAL)),
             "train split (fresh)": list(scenes(args.seed + 2, args.test, TRAIN))}
    tok_train = image_tokens(models.encoder, train)
    tok_tests = {k: image_tokens(models.encoder, v) for k, v in tests.items()}
    print(f"{len(train)} training-split renders, {args.test} per test set; tokens {tuple(tok_train.shape[1:])} "
          f"(encoded in {time.perf_counter() - started:.0f} s)\n", file=sys.stderr)
    features = {
        "mean-pooled (128)": lambda t: t.mean(1),
        "CLS (128)": lambda t: t[:, 0],
        "all tokens flattened (65×128)": lambda t: t.flatten(1),
    }
    rows = {k: [] for k in tests}
    for attribute, values in ATTRIBUTES.items():
        y_train = labels(train, attribute)
        row = {k: [attribute, f"{1 / len(values):.2f}"] for k in tests}
        for fname, f in features.items():
            acc = probe_accuracy(f(tok_train), y_train,
                                 {k: (f(tok_tests[k]), labels(tests[k], attribute)) for k in tests}, len(values))
            for k in tests:
                row[k].append(acc[k])
        for k in tests:
            rows[k].append(row[k])
        print(f"  {attribute} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    for k in tests:
        print(f"**Linear probe on the image tokens, tested on {k} renders** ({args.train} training-split renders "
              f"to fit, {args.test} to test; accuracy)\n")
        print(table(["attribute", "chance", *features], rows[k]))
        print()


# --------------------------------------------------------------------------
# 2a. The adapter's Δ across images and words
# --------------------------------------------------------------------------


def eta_squared(values: torch.Tensor, groups: torch.Tensor) -> float:
    """Share of the total variance of ``values`` (N, D) explained by the group means."""
    total = (values - values.mean(0)).square().sum()
    between = sum(int((groups == g).sum()) * (values[groups == g].mean(0) - values.mean(0)).square().sum()
                  for g in groups.unique())
    return float(between / total)


def cmd_delta(args) -> None:
    _, models, _ = load_world(args.world)
    adapter = load_adapter(args.adapter)
    images = list(scenes(args.seed, args.images, EVAL))
    tok = image_tokens(models.encoder, images)
    deltas = {w: adapter_deltas(adapter, models, tok, w) for w in WORDS}  # (N, 9, 128) each
    experts = adapter.route(torch.stack([models.text_feature(w) for w in WORDS])).tolist()

    # Spread across concept images, per word; across words, per image.
    rows = []
    for w, e in zip(WORDS, experts):
        d = deltas[w].flatten(1)
        norm = float(d.norm(dim=1).mean())
        spread = float((d - d.mean(0)).square().sum(1).mean().sqrt())
        cos = torch.nn.functional.cosine_similarity(d[:, None], d[None], dim=-1)
        off = cos[~torch.eye(len(d), dtype=torch.bool)].mean()
        per_block = deltas[w].norm(dim=-1).mean(0)
        rows.append([f'"{w}"', e + 1, norm, spread, spread / norm, float(off),
                     "/".join(f"{v:.1f}" for v in per_block.tolist())])
    stacked = torch.stack([deltas[w].flatten(1) for w in WORDS], dim=1)  # (N, W, 9·128)
    word_spread = (stacked - stacked.mean(1, keepdim=True)).square().sum(-1).mean(1).sqrt()  # (N,)
    word_norm = stacked.norm(dim=-1).mean(1)
    print(f"**The adapter's Δ on {args.images} held-out concept images** (Δ of the whole table, 9 blocks × 128; "
          f"spread = root-mean-square distance from the mean over the images)\n")
    print(table(["word", "expert", "mean ‖Δ‖", "spread across images", "spread / ‖Δ‖",
                 "mean cosine between images", "mean ‖Δ_i‖ per block (double 1–3, single 1–6)"], rows))
    print(f"\nAcross the 4 words for the same image: spread {float(word_spread.mean()):.2f}, "
          f"spread / ‖Δ‖ {float((word_spread / word_norm).mean()):.2f} (mean over the {args.images} images).\n")
    # Which words the adapter tells apart: Δ of two words for the same image, and the words' neutral features.
    from mod_adapter.modules.training.features import clip_pooled

    every = [*SHAPES, *GROUPS]
    pooled_all = clip_pooled(every, models.pipe.text_encoder, models.pipe.tokenizer)
    neutral_all = torch.stack([models.text_feature(w) for w in every])
    near_rows = []
    for i, w in enumerate(every):
        rel_n = (neutral_all - neutral_all[i]).norm(dim=1) / neutral_all[i].norm()
        rel_p = (pooled_all - pooled_all[i]).norm(dim=1) / pooled_all[i].norm()
        rel_n[i] = rel_p[i] = float("inf")
        j = int(rel_n.argmin())
        near_rows.append([f'"{w}"', f'"{every[j]}"', float(rel_n[j]), float(rel_p[int(rel_p.argmin())]),
                          f'"{every[int(rel_p.argmin())]}"', int(adapter.route(neutral_all[i:i + 1])[0]) + 1])
    print("**The adapter's word input**: for each of the world's 10 concept words, the nearest other word by its "
          "neutral feature n = vector_in(CLIP pooled(word)), and the relative distance ‖n_a − n_b‖ / ‖n_a‖ (and the "
          "same for CLIP's pooled output before vector_in)\n")
    print(table(["word", "nearest word (n)", "‖n_a − n_b‖ / ‖n_a‖", "same, CLIP pooled", "nearest (pooled)",
                 "expert"], near_rows))
    print()
    neutral = torch.stack([models.text_feature(w) for w in WORDS])
    normed = adapter.neutral_norm(neutral).detach()
    pair_rows = []
    for i, a in enumerate(WORDS):
        for j in range(i + 1, len(WORDS)):
            b = WORDS[j]
            cos_delta = torch.nn.functional.cosine_similarity(deltas[a].flatten(1), deltas[b].flatten(1), dim=1)
            rel = (deltas[a] - deltas[b]).flatten(1).norm(dim=1) / deltas[a].flatten(1).norm(dim=1)
            pair_rows.append([f'"{a}" – "{b}"',
                              float(torch.nn.functional.cosine_similarity(neutral[i], neutral[j], dim=0)),
                              float(torch.nn.functional.cosine_similarity(normed[i], normed[j], dim=0)),
                              float(cos_delta.mean()), float(rel.mean())])
    print("**Two words, the same concept image**: cosine of the words' neutral features n = vector_in(CLIP(word)) "
          "(raw, and after the adapter's LayerNorm), and of their Δ tables (mean over the images)\n")
    print(table(["words", "cos(n_a, n_b)", "cos after LayerNorm", "cos(Δ_a, Δ_b), same image",
                 "‖Δ_a − Δ_b‖ / ‖Δ_a‖"], pair_rows))
    print()

    # What the variation across images follows: η² per attribute, and a linear probe on Δ.
    many = list(scenes(args.seed + 10, args.probe_images, EVAL))
    train = list(scenes(args.seed + 11, args.probe_images, TRAIN))
    tok_many, tok_train = image_tokens(models.encoder, many), image_tokens(models.encoder, train)
    eta_rows, probe_rows = [], []
    for w in WORDS:
        d_eval = adapter_deltas(adapter, models, tok_many, w).flatten(1)
        d_train = adapter_deltas(adapter, models, tok_train, w).flatten(1)
        eta_rows.append([f'"{w}"'] + [eta_squared(d_eval, labels(many, a)) for a in ATTRIBUTES])
        row = [f'"{w}"']
        for a in ("colour", "pattern", "position", "size", "direction", "tint", "background"):
            acc = probe_accuracy(d_train, labels(train, a), {"t": (d_eval, labels(many, a))}, len(ATTRIBUTES[a]))
            row.append(acc["t"])
        probe_rows.append(row)
    print(f"**What Δ's variation across images follows**: η², the share of the variance of Δ (over "
          f"{args.probe_images} held-out images) explained by each attribute's value\n")
    print(table(["word", *ATTRIBUTES], eta_rows))
    print(f"\n**Linear probe on the adapter's Δ** (fit on {args.probe_images} training-split images, tested on "
          f"{args.probe_images} held-out ones; chance: colour 0.12, pattern 0.25, position 0.33, size 0.50, "
          f"direction 0.25, tint 0.50, background 0.25)\n")
    print(table(["word", "colour", "pattern", "position", "size", "direction", "tint", "background"], probe_rows))
    print()


# --------------------------------------------------------------------------
# 2b + 4. Learn Concept per image, judged as eval-learn judges it, and its Δ against the adapter's
# --------------------------------------------------------------------------



def cmd_learn(args) -> None:
    """modules/world/evaluation.py's concept_learning (its concept and prompt draws, its learn_concept_files call,
    its scores), with extra rows sampled on the same prompts and seeds: the Δ on the double or the single blocks
    only, and the adapter's Δ."""
    from mod_adapter.modules.concept_file import load_concept
    from mod_adapter.modules.learn_concept import LearnConfig
    from mod_adapter.modules.learn_diffusers import learn_concept_files
    from mod_adapter.modules.token_modulation import TokenConcept
    from mod_adapter.modules.world.evaluation import judge_reads, score, word_positions
    from mod_adapter.modules.world.methods import AdapterPredictor
    from mod_adapter.modules.world.sampling import generate
    from mod_adapter.modules.world.transformer import MAX_SEQUENCE_LENGTH
    from PIL import Image

    paths, models, judge = load_world(args.world)
    pipe = models.pipe
    predictor = AdapterPredictor(models, args.adapter)
    nd = len(pipe.transformer.transformer_blocks)
    lr = args.learn_lr  # None: Learn Concept's learning-rate rule
    summary_rows, block_rows, cos_rows = [], [], []
    read_values: Dict[tuple, Dict[str, int]] = {}
    concept_values: List[str] = []
    for kind in args.kinds:
        work = os.path.join(args.work_dir, kind)
        os.makedirs(work, exist_ok=True)
        scores: Dict[str, List[tuple]] = {}
        for c, concept_scene, targets in eval_learn_draws(kind, args.seed, args.concepts, args.prompts):
            image_path = os.path.join(work, f"{kind}-{c:03d}.png")
            delta_path = os.path.join(work, f"{kind}-{c:03d}.safetensors")
            Image.fromarray(render(concept_scene)).save(image_path)
            seconds = float("nan")
            if not os.path.exists(delta_path):
                config = LearnConfig(steps=args.learn_steps, stage1_steps=max(1, args.learn_steps * 4 // 7), lr=lr,
                                     batch_size=LearnConfig.batch_size, seed=args.seed + c, flip_probability=0.0,
                                     log_every=0)
                started = time.perf_counter()
                learn_concept_files(paths["flux"], [image_path], concept_caption(concept_scene, kind), [kind],
                                    delta_path, config=config, resolution=64, device="cpu", dtype="fp32",
                                    gradient_checkpointing=False, max_sequence_length=MAX_SEQUENCE_LENGTH,
                                    eval_draws=0, overwrite=True, show_progress=False, log=lambda message: None)
                seconds = time.perf_counter() - started
            learned = load_concept(delta_path).delta
            predicted = predictor.delta(concept_scene, kind)
            prompts = [concept_caption(t, kind) for t in targets]
            seeds = [args.seed * 1000 + c * args.prompts + i for i in range(len(prompts))]
            double_only, single_only = learned.clone(), learned.clone()
            double_only[nd:] = 0
            single_only[:nd] = 0
            variants = {"bare word": None, "Learn Concept Δ": learned, "Learn Concept Δ, double blocks only":
                        double_only, "Learn Concept Δ, single blocks only": single_only, "adapter Δ": predicted,
                        f"adapter Δ × {args.adapter_scale:g}": predicted * args.adapter_scale}
            for name, delta in variants.items():
                concepts = None if delta is None else [[TokenConcept(delta, word_positions(pipe, p, kind), 1.0,
                                                                     name=kind)] for p in prompts]
                reads = judge_reads(judge, generate(pipe, prompts, seeds, steps=args.steps, cfg=args.cfg,
                                                    concepts=concepts))
                scores.setdefault(name, []).extend(score(r, concept_scene, t, kind) for r, t in zip(reads, targets))
                first = CONCEPT_ATTRIBUTES[kind][0]
                for r in reads:
                    read_values.setdefault((kind, name), {}).setdefault(r[first], 0)
                    read_values[(kind, name)][r[first]] += 1
            # Where the Δs live, and how they compare.
            cos = torch.nn.functional.cosine_similarity(learned, predicted, dim=-1)
            offsets = learned - learned.mean(0, keepdim=True)
            label = f"{kind} {c}: {describe(concept_scene, kind)}"
            concept_values.append(label)
            block_rows.append([label, "Learn Concept ‖Δ_i‖", *learned.norm(dim=-1).tolist()])
            block_rows.append([label, "its per-block offset ‖Δ_i − mean‖", *offsets.norm(dim=-1).tolist()])
            block_rows.append([label, "adapter ‖Δ_i‖", *predicted.norm(dim=-1).tolist()])
            cos_rows.append([label, *cos.tolist(),
                             float(torch.nn.functional.cosine_similarity(learned.flatten(), predicted.flatten(), 0))])
            cp_l = np.mean([s[0] for s in scores["Learn Concept Δ"][-args.prompts:]])
            cp_b = np.mean([s[0] for s in scores["bare word"][-args.prompts:]])
            print(f"{label}: CP learned {cp_l:.2f}, bare {cp_b:.2f}; learned in "
                  f"{'(cached)' if math.isnan(seconds) else f'{seconds:.0f} s'}", file=sys.stderr)
        for name, values in scores.items():
            seen = read_values[(kind, name)]
            spread = ", ".join(f"{v} {n}" for v, n in sorted(seen.items(), key=lambda item: -item[1]))
            summary_rows.append([kind, name, len(values), float(np.mean([v[0] for v in values])),
                                 float(np.mean([v[1] for v in values])), spread])
    print(f"**Learn Concept on held-out concept images, judged as `world eval-learn` judges them** "
          f"({args.concepts} concept image(s) per kind × {args.prompts} prompts, seed {args.seed}, "
          f"{args.learn_steps} steps at lr {lr if lr is not None else 'by the rule'}; every row on the same prompts and seeds)\n")
    print(table(["kind", "Δ on the word", "images", "CP", "PF", "what the judge reads (first attribute of the kind)"],
                summary_rows))
    print("\nConcept values: " + "; ".join(concept_values))
    names = [f"d{i + 1}" for i in range(nd)] + [f"s{i + 1}" for i in range(models.num_blocks - nd)]
    print("\n**Norm per block** (d = double-stream block, s = single-stream block, in the order the image "
          "passes them)\n")
    print(table(["concept", "Δ", *names], block_rows))
    print("\n**Cosine between the adapter's Δ and Learn Concept's Δ for the same image, per block**\n")
    print(table(["concept", *names, "whole table"], cos_rows))
    print()


# --------------------------------------------------------------------------
# 3. What training sees
# --------------------------------------------------------------------------


@torch.no_grad()
def cmd_training(args) -> None:
    from mod_adapter.modules.diffusers_flux_host import DiffusersFluxConcepts
    from mod_adapter.modules.flow_matching import flow_matching_pair
    from mod_adapter.modules.flux_diffusers import flux_velocity, vae_encode
    from mod_adapter.modules.token_modulation import TokenConcept
    from mod_adapter.modules.world.sampling import encode_prompts
    from mod_adapter.modules.world.transformer import MAX_SEQUENCE_LENGTH

    # (a) the pairs as `world make-pairs --count 20000 --seed 0` builds them (pairs() without rendering)
    started = time.perf_counter()
    counts: Dict[str, int] = {}
    values: Dict[str, Dict[str, int]] = {}
    for pair in pairs(args.pairs_seed, args.pairs_count):
        counts[pair.kind] = counts.get(pair.kind, 0) + 1
        values.setdefault(pair.kind, {})
        values[pair.kind][pair.attribute_caption] = values[pair.kind].get(pair.attribute_caption, 0) + 1
    rows = []
    for kind in CONCEPT_KINDS:
        per_value = list(values[kind].values())
        rows.append([kind, counts[kind], f"{counts[kind] / args.pairs_count:.0%}", len(per_value),
                     f"{min(per_value)}–{max(per_value)}"])
    print(f"**The adapter's training pairs** (`world make-pairs --count {args.pairs_count} --seed "
          f"{args.pairs_seed}`, counted from modules/world/pairs.py without rendering, "
          f"{time.perf_counter() - started:.0f} s)\n")
    print(table(["kind", "pairs", "share", "distinct p+ values", "pairs per value"], rows))
    print()

    paths, models, _ = load_world(args.world)
    pipe = models.pipe
    adapter = load_adapter(args.adapter)
    # (b) the pre-training target Δ* = vector_in(CLIP(p+)) − vector_in(CLIP(word)) per kind, over every value
    target_rows = []
    base = Scene("ball", "red", "plain", "left", "small", "left", "warm", "sand")
    for kind in CONCEPT_KINDS:
        names = CONCEPT_ATTRIBUTES[kind]
        grid = [{}]
        for name in names:
            grid = [dict(g, **{name: v}) for g in grid for v in ATTRIBUTES[name]]
        scene_values = [base.replace(**g) for g in grid]
        targets = torch.stack([models.text_feature(describe(s, kind)) - models.text_feature(concept_word(kind, s))
                               for s in scene_values])
        norm = float(targets.norm(dim=1).mean())
        spread = float((targets - targets.mean(0)).square().sum(1).mean().sqrt())
        neutral_norm = float(torch.stack([models.text_feature(concept_word(kind, s)) for s in scene_values])
                             .norm(dim=1).mean())
        target_rows.append([kind, len(scene_values), neutral_norm, norm, spread, spread / norm])
    print("**The pre-training target** Δ* = vector_in(CLIP(p+)) − vector_in(CLIP(word)), over every value of the "
          "kind (spread = RMS distance from the kind's mean Δ*)\n")
    print(table(["kind", "values", "‖n‖ (word)", "mean ‖Δ*‖", "spread of Δ* across values", "spread / ‖Δ*‖"],
                target_rows))
    print()

    # (c) per-kind flow-matching loss of the training pairs: Δ = 0, the adapter's Δ, the pre-training target on
    # every block (description only), and the text oracle (the target's caption with the concept's value stated)
    host = DiffusersFluxConcepts(pipe.transformer)
    per_kind = {k: {v: [] for v in ("zero", "adapter", "description", "oracle")} for k in CONCEPT_KINDS}
    sig_kind: Dict[str, List[float]] = {k: [] for k in CONCEPT_KINDS}
    cos_kind: Dict[str, List[float]] = {k: [] for k in CONCEPT_KINDS}
    chosen = list(pairs(args.pairs_seed, args.per_kind * len(CONCEPT_KINDS)))
    started = time.perf_counter()
    for start in range(0, len(chosen), args.batch):
        chunk = chosen[start:start + args.batch]
        tok = image_tokens(models.encoder, [p.concept for p in chunk])
        neutral = torch.stack([models.text_feature(p.word) for p in chunk])
        predicted = adapter(neutral, tok)
        described = torch.stack([models.text_feature(p.attribute_caption) for p in chunk]) - neutral
        described = described[:, None].expand_as(predicted)
        for b, p in enumerate(chunk):
            cos_kind[p.kind].append(float(torch.nn.functional.cosine_similarity(predicted[b].mean(0),
                                                                                described[b, 0], dim=0)))
        pixels = torch.from_numpy(np.stack([render(p.target) for p in chunk])).float().div(127.5).sub(1.0)
        x0 = vae_encode(pipe.vae, pixels.permute(0, 3, 1, 2))
        embeds, pooled = encode_prompts(pipe, [p.caption for p in chunk], MAX_SEQUENCE_LENGTH)
        full_embeds, full_pooled = encode_prompts(pipe, [full_caption(p.target) for p in chunk], MAX_SEQUENCE_LENGTH)
        positions = [models.positions(p.caption, p.word) for p in chunk]
        for draw in range(args.draws):
            generator = torch.Generator().manual_seed(args.seed * 100003 + start * 31 + draw)
            sigma = torch.sigmoid(torch.randn(len(chunk), generator=generator))  # training's logit-normal σ
            noise = torch.randn(x0.shape, generator=generator)
            noisy, target = flow_matching_pair(x0, noise, sigma)
            for name, deltas in (("zero", None), ("adapter", predicted), ("description", described),
                                 ("oracle", None)):
                concepts = [] if deltas is None else [
                    TokenConcept(delta=deltas[b], positions=positions[b], batch_rows=[b], name=chunk[b].word)
                    for b in range(len(chunk))]
                e, pl = (full_embeds, full_pooled) if name == "oracle" else (embeds, pooled)
                with host.using(concepts):
                    velocity = flux_velocity(pipe.transformer, noisy, sigma, e, pl, None)
                loss = (velocity - target).square().mean((1, 2, 3))
                for b, p in enumerate(chunk):
                    per_kind[p.kind][name].append(float(loss[b]))
            for b, p in enumerate(chunk):
                sig_kind[p.kind].append(float(sigma[b]))
        print(f"  {start + len(chunk)}/{len(chosen)} pairs ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    host.remove()

    def paired(a, b, seed=0):
        diff = np.asarray(a) - np.asarray(b)
        rng = np.random.default_rng(seed)
        boots = [diff[rng.integers(len(diff), size=len(diff))].mean() for _ in range(2000)]
        return float(diff.mean()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))

    loss_rows, sigma_rows = [], []
    for kind in CONCEPT_KINDS:
        r = per_kind[kind]
        gain_a = paired(r["zero"], r["adapter"])
        gain_o = paired(r["zero"], r["oracle"])
        gain_d = paired(r["zero"], r["description"])
        share = gain_a[0] / gain_o[0] if gain_o[0] > 0 else float("nan")
        loss_rows.append([kind, len(r["zero"]), float(np.mean(r["zero"])),
                          f"{1e3 * gain_o[0]:.2f} [{1e3 * gain_o[1]:.2f}, {1e3 * gain_o[2]:.2f}]",
                          f"{1e3 * gain_a[0]:.2f} [{1e3 * gain_a[1]:.2f}, {1e3 * gain_a[2]:.2f}]",
                          f"{share:.0%}",
                          f"{1e3 * gain_d[0]:.2f} [{1e3 * gain_d[1]:.2f}, {1e3 * gain_d[2]:.2f}]",
                          float(np.mean(cos_kind[kind]))])
        sig = np.asarray(sig_kind[kind])
        row = [kind]
        for low, high in ((0.0, 0.4), (0.4, 0.8), (0.8, 1.01)):
            m = (sig >= low) & (sig < high)
            zo = np.asarray(r["zero"])[m]
            row.append(f"{1e3 * (zo - np.asarray(r['oracle'])[m]).mean():.2f} / "
                       f"{1e3 * (zo - np.asarray(r['adapter'])[m]).mean():.2f} (n={int(m.sum())})")
        sigma_rows.append(row)
    print(f"**Flow-matching loss of the training pairs per kind** (the first {args.per_kind} pairs of each kind of "
          f"the manifest, {args.draws} logit-normal σ and noise draws each, the same draws in every column; the "
          f"gains are the loss with Δ = 0 on the word-only caption minus the loss of the column, ×10⁻³, paired 95% "
          f"bootstrap intervals; {time.perf_counter() - started:.0f} s)\n")
    print(table(["kind", "samples", "loss, Δ = 0", "gain: text oracle (value stated in the caption)",
                 "gain: adapter's Δ", "adapter / oracle", "gain: pre-training target Δ* on every block",
                 "cosine(adapter's mean Δ, Δ*)"], loss_rows))
    print("\n**The same gains by σ** (text oracle / adapter, ×10⁻³)\n")
    print(table(["kind", "σ < 0.4", "0.4 ≤ σ < 0.8", "σ ≥ 0.8 (TokenVerse stage 1's range)"], sigma_rows))
    high = torch.sigmoid(torch.randn(100000, generator=torch.Generator().manual_seed(0))) >= 0.8
    print(f"\nShare of training's logit-normal σ draws at σ ≥ 0.8: {float(high.float().mean()):.1%}.")
    print()


# --------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", default="world")
    parser.add_argument("--adapter", default=ADAPTER)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe", help="1. linear probes of every attribute on the adapter's image tokens")
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_probe)
    d = sub.add_parser("delta", help="2a. the adapter's Δ across concept images and words")
    d.add_argument("--images", type=int, default=24)
    d.add_argument("--probe-images", type=int, default=800)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_delta)
    learn = sub.add_parser("learn", help="2b + 4. Learn Concept per concept image: CP as eval-learn scores it, and "
                                         "its Δ against the adapter's")
    learn.add_argument("--kinds", nargs="+", default=["lighting", "background"], choices=list(ABSTRACT_KINDS))
    learn.add_argument("--concepts", type=int, default=2)
    learn.add_argument("--prompts", type=int, default=8)
    learn.add_argument("--learn-steps", type=int, default=1400)
    learn.add_argument("--learn-lr", type=float, help="default: Learn Concept's rule")
    learn.add_argument("--adapter-scale", type=float, default=3.0)
    learn.add_argument("--steps", type=int, default=20)
    learn.add_argument("--cfg", type=float, default=4.0)
    learn.add_argument("--seed", type=int, default=11)
    learn.add_argument("--work-dir", default="out/world/why-lighting")
    learn.set_defaults(func=cmd_learn)
    t = sub.add_parser("training", help="3. what training sees: pairs per kind, per-kind loss, pre-training target")
    t.add_argument("--pairs-count", type=int, default=20000)
    t.add_argument("--pairs-seed", type=int, default=0)
    t.add_argument("--per-kind", type=int, default=200)
    t.add_argument("--draws", type=int, default=6)
    t.add_argument("--batch", type=int, default=50)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_training)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    args.func(args)


if __name__ == "__main__":
    main()
