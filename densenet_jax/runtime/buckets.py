"""Whether a run can use the bucket of a remote path: one cheap request before anything starts.

A bucket that cannot be used (a typo in its name, no credentials, no permission, no network)
used to surface as several aiohttp tracebacks from deep inside the first write, after the
dataset had been read. `check` lists at most one object of the bucket through the client the
run itself uses for the store (google-cloud-storage, botocore), without retries, and turns
the failure into one line that names the path and the cause. It writes nothing.
"""

import os
from typing import Optional

PROBE_TIMEOUT = 20  # Seconds for the probe's request; a blackholed network fails by then.


class BucketError(RuntimeError):
  """A remote path whose bucket cannot be used; the message is one line naming the cause."""


def _split(path: str):
  scheme, _, rest = path.partition('://')
  return scheme, rest.split('/', 1)[0]


def check(path: str, what: str = 'Workdir') -> None:
  """Raises BucketError if `path` is on an object store whose bucket this run cannot use.

  Args:
    path: a local path (nothing is checked) or `gs://bucket/...`, `s3://bucket/...`.
    what: how the message names the path ('Workdir', 'config.init_checkpoint', ...).
  """
  if '://' not in path:
    return
  scheme, bucket = _split(path)
  if scheme == 'gs':
    cause = _probe_gcs(bucket)
  elif scheme == 's3':
    cause = _probe_s3(bucket)
  else:
    cause = f'{scheme}:// is not supported (gs:// and s3:// are)'
  if cause:
    raise BucketError(f'{what} {path}: {cause}.')


def _probe_gcs(bucket: str) -> Optional[str]:
  try:
    from google.cloud import storage  # pylint: disable=g-import-not-at-top
    client = storage.Client()
    list(client.list_blobs(bucket, max_results=1, timeout=PROBE_TIMEOUT, retry=None))
  except Exception as e:  # pylint: disable=broad-except
    return gcs_cause(e, bucket)
  return None


def gcs_cause(error: BaseException, bucket: str) -> str:
  """The cause of a failed GCS request, in words, from google-cloud-storage's exceptions."""
  # pylint: disable=g-import-not-at-top
  from google import auth
  from google.api_core import exceptions
  import requests
  endpoint = os.environ.get('STORAGE_EMULATOR_HOST') or 'storage.googleapis.com'
  if isinstance(error, exceptions.NotFound):
    return f"bucket '{bucket}' does not exist"
  if isinstance(error, exceptions.Forbidden):
    return f"permission denied on bucket '{bucket}' ({_first_line(error)})"
  if isinstance(error, (exceptions.Unauthorized, auth.exceptions.RefreshError)):
    return f'the credentials were rejected ({_first_line(error)})'
  if isinstance(error, auth.exceptions.DefaultCredentialsError):
    return ('no Google Cloud credentials found (run `gcloud auth application-default login` '
            'or set GOOGLE_APPLICATION_CREDENTIALS)')
  if isinstance(error, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                        auth.exceptions.TransportError, ConnectionError, TimeoutError)):
    return f'cannot reach {endpoint} ({type(error).__name__})'
  return f'the bucket cannot be used ({type(error).__name__}: {_first_line(error)})'


def s3_client():
  """A botocore S3 client that fails at once (no retries): for the probe and the lease.

  It follows the same variables as s3fs and TensorStore (AWS_ENDPOINT_URL, AWS_REGION,
  AWS_ACCESS_KEY_ID, AWS_PROFILE, ...).
  """
  # pylint: disable=g-import-not-at-top
  import botocore.config
  import botocore.session
  config = botocore.config.Config(retries={'max_attempts': 1, 'mode': 'standard'},
                                  connect_timeout=PROBE_TIMEOUT, read_timeout=PROBE_TIMEOUT)
  return botocore.session.get_session().create_client('s3', config=config)


def _probe_s3(bucket: str) -> Optional[str]:
  try:
    s3_client().list_objects_v2(Bucket=bucket, MaxKeys=1)
  except ImportError:
    return 's3:// needs s3fs and botocore (pip install -r requirements.txt)'
  except Exception as e:  # pylint: disable=broad-except
    return s3_cause(e, bucket)
  return None


def s3_cause(error: BaseException, bucket: str) -> str:
  """The cause of a failed S3 request, in words, from botocore's exceptions."""
  from botocore import exceptions  # pylint: disable=g-import-not-at-top
  endpoint = os.environ.get('AWS_ENDPOINT_URL') or 'S3'
  if isinstance(error, (exceptions.NoCredentialsError, exceptions.PartialCredentialsError)):
    return ('no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or '
            'AWS_PROFILE)')
  if isinstance(error, exceptions.ClientError):
    code = error.response.get('Error', {}).get('Code', '')
    status = error.response.get('ResponseMetadata', {}).get('HTTPStatusCode')
    if code in ('NoSuchBucket', '404') or (status == 404 and not code):
      return f"bucket '{bucket}' does not exist"
    if code in ('InvalidAccessKeyId', 'SignatureDoesNotMatch', 'ExpiredToken',
                'InvalidToken', 'TokenRefreshRequired'):
      return f'the credentials were rejected ({code})'
    if code in ('AccessDenied', 'AllAccessDisabled', '403') or status == 403:
      return f"permission denied on bucket '{bucket}' ({code or status})"
    return f'the bucket cannot be used ({code or status}: {_first_line(error)})'
  if isinstance(error, (exceptions.EndpointConnectionError, exceptions.ConnectTimeoutError,
                        exceptions.ReadTimeoutError, ConnectionError, TimeoutError)):
    return f'cannot reach {endpoint} ({type(error).__name__})'
  return f'the bucket cannot be used ({type(error).__name__}: {_first_line(error)})'


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return text[0][:200] if text else type(error).__name__
