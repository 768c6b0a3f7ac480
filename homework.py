"""The homework from this solution: the students' starter copy and a Gradescope autograder.

    python homework.py starter OUT          # the students' copy, graded regions blank
    python homework.py autograder OUT.zip   # Gradescope's autograder for the same homework

A graded region is the code between a `### START CODE HERE ###` line and a `### END CODE HERE
###` line of a file in GRADED_FILES, as the assignment marks them; a file may hold any number.
In the starter each region keeps its markers and its leading comment lines, and gets a comment
naming what the code after it expects and a line that stops the script in one line (util.cli)
naming the function to complete. `fill` puts a solution's regions back into a starter file.
"""
import ast
import io
import itertools
import subprocess
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import util

ROOT = Path(__file__).resolve().parent
GRADED_FILES = ('protonet.py', 'maml.py', 'maml_transfer.py')
# Left out of the starter: the solution's tests and tools, and our results (the answers to the
# handouts' written questions and the --test results behind them).
INSTRUCTOR_ONLY = ('reference.py', 'homework.py', 'tests/', 'benchmarks/', '.ci/',
                   'docs/HANDOUT.md', 'docs/RESULTS.md', 'docs/test_results/', 'figures/')
SOLUTION_FILES = ('reference.py',)  # what the autograder adds to the starter: hidden tests' module
START = '### START CODE HERE ###'
END = '### END CODE HERE ###'

SETUP_SH = '''#!/usr/bin/env bash
# Gradescope runs this once, building the autograder's image: the pinned requirements in a
# virtual environment (Python >= 3.11, README), then the Omniglot data the grader reads.
set -euo pipefail
cd "$(dirname "$0")"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "error: this image's python3 is $(python3 --version 2>&1 | cut -d' ' -f2); the pinned" \
        "requirements need 3.11 or newer: pick a newer base image (Ubuntu 24.04) in" \
        "Gradescope's autograder settings" >&2
    exit 2
}
VENV="${AUTOGRADER_ROOT:-/autograder}/venv"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -r requirements.txt
"$VENV/bin/python" protonet.py --cache
'''

RUN_AUTOGRADER = '''#!/usr/bin/env bash
# Gradescope runs this for each submission: the submission's graded files replace the blank
# ones of the source tree, then grader.py writes results/results.json. AUTOGRADER_ROOT
# (default /autograder) moves the whole layout; arguments go to grader.py (say, test ids).
set -uo pipefail
ROOT="${AUTOGRADER_ROOT:-/autograder}"
RESULTS="$ROOT/results/results.json"
cd "$ROOT/source"
for name in GRADED_FILES; do
    found=$(find "$ROOT/submission" -name "$name" -type f | sort | head -n 1)
    if [ -n "$found" ]; then
        cp "$found" "$name"
    else
        echo "$name is not in the submission: its blank regions are graded"
    fi
done
mkdir -p "$ROOT/results"
rm -f "$RESULTS"
PYTHON="$ROOT/venv/bin/python"
[ -x "$PYTHON" ] || PYTHON=python3
"$PYTHON" grader.py "$@" --gradescope "$RESULTS" 2>&1 | tee "$ROOT/results/grader.log"
if [ ! -f "$RESULTS" ]; then  # grader.py stopped before grading, say on a submission's typo
    "$PYTHON" -c 'import json, sys; print(json.dumps({"score": 0, "tests": [], "output":
        "grader.py stopped before grading:\\n" + "".join(open(sys.argv[1]).readlines()[-20:])}))' \\
        "$ROOT/results/grader.log" > "$RESULTS"
fi
'''


@dataclass(frozen=True)
class Region:
    """A graded region: lines[start] is its START marker, lines[end] its END marker."""
    start: int
    end: int
    indent: str
    name: str  # the qualified name of the function holding it, e.g. ProtoNet._step
    function: ast.AST = field(compare=False, repr=False)  # that function's syntax tree


def find_regions(text, path):
    """The graded regions of a file's text, in order; a marker without its partner, a nested
    one or one outside a function is a UserError naming the file and line."""
    lines = text.splitlines(keepends=True)
    functions = function_spans(ast.parse(text, str(path)))
    regions, start = [], None
    for number, line in enumerate(lines):
        marker = line.strip()
        if marker not in (START, END):
            continue
        if (marker == START) != (start is None):
            raise util.UserError(f'{path}:{number + 1}: {marker} without its partner; every '
                                 f'{START} line needs one {END} line after it')
        if marker == START:
            start = number
            continue
        regions.append(Region(start, number, lines[start][:-len(lines[start].lstrip())],
                              *enclosing(functions, start + 1, path)))
        start = None
    if start is not None:
        raise util.UserError(f'{path}:{start + 1}: {START} without its {END} line')
    return regions


def function_spans(tree, prefix=''):
    """[(first line, last line, qualified name, node)] of every function in an ast."""
    spans = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = prefix + node.name
            if not isinstance(node, ast.ClassDef):
                spans.append((node.lineno, node.end_lineno, name, node))
            spans += function_spans(node, name + '.')
    return spans


def enclosing(functions, line, path):
    """(name, node) of the innermost function around a 1-based line number."""
    around = [span for span in functions if span[0] < line <= span[1]]
    if not around:
        raise util.UserError(f'{path}:{line}: {START} outside a function; mark code inside the '
                             f'function to complete')
    return max(around, key=lambda span: span[0])[2:]


def expected_names(region):
    """(names the region assigns that its function uses after it, whether it returns)."""
    first, last = region.start + 1, region.end + 1  # 1-based lines of the markers
    nodes = list(ast.walk(region.function))
    assigned = [n.id for n in nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
                and first < n.lineno < last]
    used = {n.id for n in nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
            and n.lineno > last}
    returns = any(isinstance(n, ast.Return) and first < n.lineno < last for n in nodes)
    return list(dict.fromkeys(name for name in assigned if name in used)), returns


def blank_lines(text, region, path):
    """A region's starter lines: its leading comments, what to compute, and the stop line."""
    lines = text.splitlines(keepends=True)[region.start + 1:region.end]
    comments = list(itertools.takewhile(lambda line: line.lstrip().startswith('#'), lines))
    names, returns = expected_names(region)
    uses = 'uses them' if len(names) > 1 else 'uses it'
    wanted = ([f'assign {", ".join(names)} (the code below {uses})'] if names else []) + (
        ['return what the docstring says'] if returns else []) or ['write what is missing here']
    stop = f'complete {region.name} in {path}: its CODE HERE region is blank'
    return comments + [f'{region.indent}# TODO: {" and ".join(wanted)}.\n',
                       f'{region.indent}raise util.UserError(\n',
                       f'{region.indent}    {stop!r})\n']


def blank(text, path):
    """The starter text of a graded file: each region's code replaced by blank_lines, whose
    stop line needs the file to import util."""
    if find_regions(text, path) and 'import util\n' not in text:
        raise util.UserError(f'{path} has graded regions but does not import util, which their '
                             f'blanks raise util.UserError from; add `import util`')
    return replace_regions(text, path, [blank_lines(text, region, path)
                                        for region in find_regions(text, path)])


def fill(starter_text, solution_text, path):
    """A starter file's text with each blank region holding the solution's code again."""
    lines = solution_text.splitlines(keepends=True)
    regions = find_regions(solution_text, path)
    return replace_regions(starter_text, path, [lines[region.start + 1:region.end]
                                                for region in regions])


def replace_regions(text, path, contents):
    """text with the lines strictly inside its i-th region replaced by contents[i]."""
    lines = text.splitlines(keepends=True)
    regions = find_regions(text, path)
    if len(regions) != len(contents):
        raise util.UserError(f'{path} has {len(regions)} graded regions where {len(contents)} '
                             f'were expected; compare its {START} markers with the solution')
    for region, content in reversed(list(zip(regions, contents))):
        lines[region.start + 1:region.end] = content
    return ''.join(lines)


def tracked_files():
    """The repository's files, as git lists them (tracked, or new and not ignored): relative
    paths."""
    try:
        listed = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others',
                                 '--exclude-standard'], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        raise util.UserError(f'cannot list the files of {ROOT} with git ({error}); run from a '
                             f'clone of the repository') from None
    return [name for name in listed.split('\0') if name]


def starter_files():
    """{relative path: text or bytes} of the students' copy: every tracked file but the
    instructor's, graded files blank."""
    files = {}
    for name in tracked_files():
        if name.startswith(INSTRUCTOR_ONLY):
            continue
        if name in GRADED_FILES:
            text = (ROOT / name).read_text()
            files[name] = blank(text, name)
            if files[name] == text:
                print(f'note: {name} has no {START} region; it is copied whole')
        else:
            files[name] = (ROOT / name).read_bytes()
    return files


def new_path(path):
    """path, refused in one line if something is already there."""
    path = Path(path)
    if path.exists():
        raise util.UserError(f'{path} already exists; name a new path, or delete it first')
    return path


def write_starter(out):
    """Writes the students' copy into the new folder out."""
    out = new_path(out)
    for name, content in starter_files().items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(content.encode() if isinstance(content, str) else content)
    print(f'Wrote the starter to {out}')


def write_autograder(zip_path):
    """Writes Gradescope's autograder zip: the starter, the solution module, setup.sh and
    run_autograder at the archive's root."""
    zip_path = new_path(zip_path)
    files = starter_files() | {name: (ROOT / name).read_bytes() for name in SOLUTION_FILES}
    scripts = {'setup.sh': SETUP_SH,
               'run_autograder': RUN_AUTOGRADER.replace('GRADED_FILES', ' '.join(GRADED_FILES))}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, 'w', zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            archive.writestr(name, content)
        for name, content in scripts.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o100755 << 16  # a regular file, executable
            archive.writestr(info, content)
    zip_path.write_bytes(buffer.getvalue())
    print(f'Wrote the autograder to {zip_path}')


def parse_args(argv=None):
    parser = util.argument_parser(description=__doc__.split('\n')[0])
    commands = parser.add_subparsers(dest='command', required=True)
    commands.add_parser('starter', help="write the students' copy").add_argument(
        'out', help='a new folder')
    commands.add_parser('autograder', help="write Gradescope's autograder zip").add_argument(
        'out', help='a new .zip file')
    return parser.parse_args(argv)


def main(args):
    {'starter': write_starter, 'autograder': write_autograder}[args.command](args.out)


if __name__ == '__main__':
    util.cli(lambda: main(parse_args()))
