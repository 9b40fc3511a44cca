"""Draws one OMoE layer, the README's architecture figure: python notebooks/figures/draw_architecture.py

    y = W0 x + Σ_k g_k q_k,   q = Gram–Schmidt(e_i for the active i),
    e_i = (α/r) B_i A_i x,   g = top-k softmax(W_g x)

Writes omoe_layer.png beside this file. Boxes are placed on a 16 x 8 grid of data units.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # a file, no window
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

OUT = Path(__file__).resolve().parent / "omoe_layer.png"
FROZEN, EXPERT, ROUTER, METHOD = "#d9d9d9", "#cfe2f3", "#fce5cd", "#d9ead3"  # grey: frozen; colours: trained / OMoE


def box(ax, x, y, w, h, text, colour, size=10, style="round,pad=0.02,rounding_size=0.15"):
    # a labelled box with its lower-left corner at (x, y); returns its left, right, top and bottom midpoints
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle=style, facecolor=colour, edgecolor="black", lw=1))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size)
    return dict(left=(x, y + h / 2), right=(x + w, y + h / 2), top=(x + w / 2, y + h), bottom=(x + w / 2, y))


def arrow(ax, start, end, text=None, offset=(0, 0.18), rad=0.0):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, lw=1.2, color="black",
                                 connectionstyle=f"arc3,rad={rad}", shrinkA=2, shrinkB=2))
    if text:
        ax.text((start[0] + end[0]) / 2 + offset[0], (start[1] + end[1]) / 2 + offset[1], text, ha="center",
                va="bottom", fontsize=9)


def draw(path: Path = OUT) -> Path:
    fig, ax = plt.subplots(figsize=(13, 6.2))
    ax.set_xlim(0, 16)
    ax.set_ylim(0, 8)
    ax.axis("off")

    x = box(ax, 0.2, 3.6, 1.3, 0.8, "x\n(D_in)", "white", 11)
    base = box(ax, 3.0, 6.5, 3.2, 0.9, r"frozen $W_0$" "\n(the pretrained nn.Linear)", FROZEN)

    # E LoRA experts, stacked: expert i computes e_i = (α/r) B_i (A_i x)
    experts = []
    for i, (label, y) in enumerate([("1", 4.9), ("2", 3.7), ("E", 2.3)]):
        a = box(ax, 3.0, y, 1.3, 0.75, f"$A_{label}$\n(r × D_in)", EXPERT, 9)
        b = box(ax, 4.9, y, 1.3, 0.75, f"$B_{label}$\n(D_out × r)", EXPERT, 9)
        arrow(ax, a["right"], b["left"], "r", offset=(0, 0.05))
        experts.append((a, b))
    ax.text(3.65, 3.38, "⋮", ha="center", va="center", fontsize=16)
    ax.text(5.55, 3.38, "⋮", ha="center", va="center", fontsize=16)
    ax.text(4.9, 5.9, r"E LoRA experts, $e_i = (\alpha/r)\, B_i A_i x$; $B_i = 0$ at step 0", ha="center",
            fontsize=9, style="italic")
    router = box(ax, 3.0, 0.6, 3.2, 1.0, r"router $W_g$ (E × D_in)" "\nsoftmax → top-k → renormalise", ROUTER, 9)

    for target in [base["left"], *(a["left"] for a, _ in experts), router["left"]]:
        arrow(ax, x["right"], target)

    gs = box(ax, 7.4, 2.3, 2.6, 3.35, "Gram–Schmidt\nover the active\nexperts, in index\norder\n\n"
             r"$q_1 \dots q_K$" "\northonormal\n" r"(+ ridge $\varepsilon$)", METHOD, 10)
    for i, (_, b) in enumerate(experts):
        label = ["$e_1$", "$e_2$", "$e_E$"][i]
        arrow(ax, b["right"], (gs["left"][0], b["right"][1]), label, offset=(0, 0.05))

    mix = box(ax, 11.2, 3.35, 1.9, 1.3, "weighted mix\n" r"$\sum_k g_k q_k$", METHOD, 10)
    arrow(ax, gs["right"], mix["left"], "$q_k$", offset=(0, 0.05))
    arrow(ax, router["right"], mix["bottom"], r"gates $g$ (0 outside the top k)", offset=(1.6, -0.75), rad=0.25)

    plus = box(ax, 13.75, 6.55, 0.8, 0.8, "+", "white", 16, style="circle,pad=0.05")
    arrow(ax, base["right"], plus["left"], r"$W_0 x$", offset=(0, 0.05))
    arrow(ax, mix["top"], plus["bottom"], "update", offset=(-0.55, -0.1), rad=-0.2)
    y = box(ax, 14.85, 3.6, 1.0, 0.8, "y\n(D_out)", "white", 11)
    arrow(ax, plus["right"], y["top"], rad=-0.3)

    ax.text(14.0, 1.9, "the fast path (what trains):\nthe same mix as " r"$\sum_i c_i e_i$," "\n"
            r"$c = R^{-1} g$, $R^\top R$ = the Gram" "\nof the $e_i$, from rank space\n(notebook 3)",
            ha="center", va="center", fontsize=8.5, color="#38761d")
    ax.text(8.0, 7.75, r"One OMoE layer, for one token $x$:  $y = W_0 x + \sum_k g_k q_k$", ha="center", fontsize=13)
    ax.text(0.2, 0.1, "grey: frozen · blue, orange: trained (experts, router) · green: OMoE's orthogonalisation "
            "and mix; 1 expert and no router is plain LoRA, no Gram–Schmidt is vanilla MoE-LoRA",
            fontsize=8.5, color="#444444")
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


if __name__ == "__main__":
    print("wrote", draw())
