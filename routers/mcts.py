"""UCT Monte Carlo Tree Search over edited execution paths (Dr.LLM, arXiv 2510.12773, Sec. 3.1).

State: a path pi (order-preserving block indices), root [0 .. L-1]. Edits: skip 1 or 2
consecutive entries, or repeat one entry in place; at most one repeat per block, |pi| <= 2L,
pi non-empty. Reward: evaluator(pi) in {0, 1} (greedy generation correct), memoised.

One simulation = select -> expand -> evaluate -> back-propagate:
* select: from the root, while the node may not grow, go to the child maximising
  UCB(pi) = Q/v + c * sqrt(ln V_parent / v) - lambda * |pi| / L   (c = 1.8, lambda = 3.0, L the
  model's true depth), or to a uniformly random child with probability 0.1;
* expand: add one untried edit (random order) as a new child and evaluate its path;
* back-propagate the reward to the root.
"May grow" is progressive widening (Coulom 2007; Couetoux et al. 2011): a node with v visits
may hold ceil(k * v^alpha) children (k = 1, alpha = 0.7), added in random order. With ~3L
edits per node and 50 simulations, plain "expand until fully expanded" spends the whole budget
on the root's children when L ~ 30; widening lets the tree deepen while still branching
(alpha = None gives plain UCT; alpha = 0.7 was the best compromise on our stub searches).

Early stop (paper): when a path fixes a base error (base wrong, path right) or a correct path
with |pi| <= L - 2 is found. Target pi*: among correct paths (the default one included), the
shortest, ties broken by fewer distinct blocks; labels y_l = count of l in pi* in {0, 1, 2}.
The reference code's "MCTS" is a random walk of accumulated edits (each node one child);
:func:`random_walk_search` reproduces it as a baseline.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from routers.paths import default_path, path_to_actions

Path = tuple[int, ...]
Evaluator = Callable[[Path], float]


@dataclass
class MCTSConfig:
    simulations: int = 50
    c: float = 1.8
    length_penalty: float = 3.0
    random_child_prob: float = 0.1
    max_skip: int = 2
    widening_k: float = 1.0
    widening_alpha: float | None = 0.7
    early_stop: bool = True
    correct_at: float = 1.0
    seed: int = 0


def edited_paths(path: Path, num_layers: int, max_skip: int = 2) -> list[Path]:
    """All distinct paths one edit away: skip 1..max_skip consecutive entries (leaving >= 1),
    or repeat entry i in place when its block runs once and |pi| < 2L."""
    out: dict[Path, None] = {}
    n = len(path)
    for width in range(1, max_skip + 1):
        for i in range(n - width + 1):
            if n - width >= 1:
                out[path[:i] + path[i + width:]] = None
    if n < 2 * num_layers:
        for i, block in enumerate(path):
            if path.count(block) == 1:
                out[path[:i + 1] + (block,) + path[i + 1:]] = None
    out.pop(path, None)
    return list(out)


@dataclass(eq=False)
class Node:
    path: Path
    parent: Node | None = None
    children: list[Node] = field(default_factory=list)
    untried: list[Path] | None = None
    visits: int = 0
    value: float = 0.0

    @property
    def depth(self) -> int:
        return 0 if self.parent is None else self.parent.depth + 1


@dataclass
class SearchResult:
    num_layers: int
    base_correct: bool
    target: Path | None                 # pi*, None when no correct path was found (drop the example)
    labels: list[int] | None            # y_l in {0, 1, 2}
    rewards: dict[Path, float]          # memo: every evaluated path
    simulations: int
    stop_reason: str                    # "budget", "fixed_base_error", "short_correct_path", "exhausted",
    #                                     "base_error_not_searched"
    tree_nodes: int = 0
    max_children: int = 0
    max_depth: int = 0

    @property
    def evaluations(self) -> int:
        return len(self.rewards)

    @property
    def fixed_base_error(self) -> bool:
        return (not self.base_correct) and self.target is not None

    @property
    def layers_saved(self) -> int | None:
        return None if self.target is None else self.num_layers - len(self.target)


def select_target(rewards: dict[Path, float], correct_at: float = 1.0) -> Path | None:
    """Shortest correct path; ties: fewer distinct blocks, then lexicographic (deterministic)."""
    correct = [p for p, r in rewards.items() if r >= correct_at]
    return min(correct, key=lambda p: (len(p), len(set(p)), p)) if correct else None


class _Memo:
    """Memoised evaluator that also applies the paper's early-stop rules."""

    def __init__(self, evaluator: Evaluator, num_layers: int, cfg: MCTSConfig):
        self.evaluator, self.num_layers, self.cfg = evaluator, num_layers, cfg
        self.rewards: dict[Path, float] = {}
        self.base_correct: bool | None = None
        self.stop_reason: str | None = None

    def __call__(self, path: Path) -> float:
        if path in self.rewards:
            return self.rewards[path]
        reward = float(self.evaluator(path))
        self.rewards[path] = reward
        correct = reward >= self.cfg.correct_at
        if self.base_correct is None:
            self.base_correct = correct
            if not correct and getattr(self.evaluator, "searches_base_errors", True) is False:
                self.stop_reason = "base_error_not_searched"  # an evaluator that cannot see a fix
        elif self.cfg.early_stop and correct:
            if not self.base_correct:
                self.stop_reason = "fixed_base_error"
            elif len(path) <= self.num_layers - 2:
                self.stop_reason = "short_correct_path"
        return reward

    def result(self, simulations: int, stop_reason: str, **tree) -> SearchResult:
        target = select_target(self.rewards, self.cfg.correct_at)
        return SearchResult(num_layers=self.num_layers, base_correct=bool(self.base_correct), target=target,
                            labels=None if target is None else path_to_actions(target, self.num_layers),
                            rewards=dict(self.rewards), simulations=simulations,
                            stop_reason=self.stop_reason or stop_reason, **tree)


class MCTS:
    """UCT search for one example; ``num_layers`` must be the model's true depth L."""

    def __init__(self, evaluator: Evaluator, num_layers: int, config: MCTSConfig | None = None):
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.cfg = config or MCTSConfig()
        self.num_layers = num_layers
        self.rng = random.Random(self.cfg.seed)
        self.memo = _Memo(evaluator, num_layers, self.cfg)
        self.root = Node(default_path(num_layers))
        self.nodes = [self.root]

    def ucb(self, child: Node, parent_visits: int) -> float:
        """Q/v + c sqrt(ln V / v) - lambda |pi| / L."""
        return (child.value / child.visits
                + self.cfg.c * math.sqrt(math.log(max(parent_visits, 1)) / child.visits)
                - self.cfg.length_penalty * len(child.path) / self.num_layers)

    def _untried(self, node: Node) -> list[Path]:
        if node.untried is None:
            node.untried = edited_paths(node.path, self.num_layers, self.cfg.max_skip)
            self.rng.shuffle(node.untried)
        return node.untried

    def _may_grow(self, node: Node) -> bool:
        if not self._untried(node):
            return False
        if self.cfg.widening_alpha is None:
            return True
        allowed = math.ceil(self.cfg.widening_k * max(node.visits, 1) ** self.cfg.widening_alpha)
        return len(node.children) < allowed

    def _select_child(self, node: Node) -> Node:
        if self.rng.random() < self.cfg.random_child_prob:
            return self.rng.choice(node.children)
        return max(node.children, key=lambda ch: self.ucb(ch, node.visits))

    def simulate(self) -> bool:
        """One simulation; False when the whole tree is exhausted (nothing left to expand)."""
        node = self.root
        while not self._may_grow(node):
            if not node.children:
                break  # a leaf with no edits left
            node = self._select_child(node)
        if self._may_grow(node):
            child = Node(self._untried(node).pop(), parent=node)
            node.children.append(child)
            self.nodes.append(child)
            node = child
        elif node is self.root and not node.children:
            return False
        reward = self.memo(node.path)
        while node is not None:
            node.visits += 1
            node.value += reward
            node = node.parent
        return True

    def run(self) -> SearchResult:
        reward = self.memo(self.root.path)  # the base path: tells whether the base was correct
        self.root.visits, self.root.value = 1, reward
        done, reason = 0, "budget"
        while done < self.cfg.simulations and self.memo.stop_reason is None:
            if not self.simulate():
                reason = "exhausted"
                break
            done += 1
        return self.memo.result(done, reason, tree_nodes=len(self.nodes),
                                max_children=max(len(n.children) for n in self.nodes),
                                max_depth=max(n.depth for n in self.nodes))


def mcts_search(evaluator: Evaluator, num_layers: int, config: MCTSConfig | None = None) -> SearchResult:
    """Run :class:`MCTS` for one example and return its :class:`SearchResult`."""
    return MCTS(evaluator, num_layers, config).run()


def random_walk_search(evaluator: Evaluator, num_layers: int, config: MCTSConfig | None = None) -> SearchResult:
    """Baseline (the reference code's behaviour): apply one random edit to the last path per
    simulation and evaluate it; same budget, memo, early stop and target rule as MCTS."""
    cfg = config or MCTSConfig()
    rng = random.Random(cfg.seed)
    memo = _Memo(evaluator, num_layers, cfg)
    path = default_path(num_layers)
    memo(path)
    done = 0
    while done < cfg.simulations and memo.stop_reason is None:
        options = edited_paths(path, num_layers, cfg.max_skip)
        if not options:
            break
        path = rng.choice(options)
        memo(path)
        done += 1
    return memo.result(done, "budget", tree_nodes=done + 1, max_children=1 if done else 0, max_depth=done)
