"""README.md: its layout table names exactly the project's files and folders."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_layout_table_matches_the_tree():
    readme = (ROOT / 'README.md').read_text()
    layout = readme[readme.index('## Layout'):]
    listed = re.findall(r'^\| `([^`]+)` \|', layout, re.M)
    present = sorted(p.name + ('/' if p.is_dir() else '') for p in ROOT.iterdir()
                     if not p.name.startswith('.') and p.name not in ('data', 'logs', '__pycache__')
                     and (p.is_dir() or p.suffix in ('.py', '.sh', '.txt', '.ini')))
    assert sorted(listed) == present
