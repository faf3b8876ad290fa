"""Command-line parsing shared by train.py and the sweep: a bad --config.FIELD is one line.

absl reports its own flag errors in one line, but ml_collections' config flags raise plain
AttributeError / KeyError / TypeError / ValueError for an unknown field or a value of the wrong
type, which absl lets through as a traceback.
"""

import re
import sys

from absl import app


def parse_flags(argv):
  """absl's parser (pass as `app.run(main, flags_parser=parse_flags)`), with config-flag errors
  turned into one line naming the flag."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raw = ' '.join(str(e).replace('\\n', ' ').replace("\\'", "'").split())
    text = raw.strip('\'" ')
    key = re.search(r'instead of "(\w+)"', raw) or re.search(r"'([A-Za-z_]\w*)'", raw)
    named = [arg.split('=')[0] for arg in argv[1:] if key and arg.startswith('--config.')
             and re.search(rf'\.{key.group(1)}(\.|$)', arg.split('=')[0])]
    if named:
      hint = re.search(r'Did you mean "(\w+)"', text)
      text = 'no such config field' + (f' (did you mean {hint.group(1)!r}?)' if hint else '')
      sys.exit(f'Config error: {named[0]}: {text}.')
    sys.exit(f'Config error: {text}')
