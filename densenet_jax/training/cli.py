"""Command-line parsing shared by train.py and the sweep: a bad --config.FIELD is one line.

absl reports its own flag errors in one line, but ml_collections' config flags raise plain
AttributeError / KeyError / TypeError / ValueError for an unknown field or a value of the wrong
type, which absl lets through as a traceback; a config file that cannot be loaded is not even
an error until the config is first used, and then a chained traceback.
"""

import re
import sys

from absl import flags


def _unloadable_config(values) -> str:
  """'--NAME=FILE: why' for a config-file flag whose file did not load; '' when all did.

  ml_collections does not raise for such a file: it hands back a stand-in that raises OSError,
  with a message of several lines, at the first use of the config.
  """
  for name in values:
    try:
      getattr(values[name].value, 'lock', None)   # Any attribute: the stand-in raises.
    except OSError as e:
      text = str(e.__cause__ or e)
      lines = [line.strip() for line in text.splitlines() if line.strip()]
      why = 'no such file' if 'No such file or directory' in text else lines[-1]
      return f'--{name}={values[name].serialize().split("=", 1)[-1]}: {why}'
  return ''


def parse_flags(argv):
  """absl's parser (pass as `app.run(main, flags_parser=parse_flags)`), with config-flag errors
  turned into one line naming the flag."""
  try:
    parsed = flags.FLAGS(argv)
  except flags.Error as e:
    if 'Error whilst parsing config file' not in str(e):   # absl's own, as absl prints it.
      sys.stderr.write(f'FATAL Flags parsing error: {e}\n'
                       'Pass --helpshort or --helpfull to see help on flags.\n')
      sys.exit(1)
    # get_config raised; ml_collections put its whole traceback in the message. Its last line
    # says what went wrong, the first which flag.
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    flag = re.match(r'flag (--\S+?):? Error whilst', lines[0])
    sys.exit(f'Config error: {flag.group(1) if flag else "--config"}: get_config failed: '
             f'{lines[-1]}')
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
  unloadable = _unloadable_config(flags.FLAGS)
  if unloadable:
    sys.exit(f'Config error: {unloadable}.')
  return parsed
