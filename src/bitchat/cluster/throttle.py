"""The login throttle of a cluster: the counts in Redis, shared by every node.

The rules are :mod:`bitchat.im.throttle`'s; here each count is a hash
``{prefix}login:a:{account digest}`` or ``{prefix}login:ip:{address}`` (fields
``n``, failures, and ``next``, when the next attempt may go, in Redis's
milliseconds) that expires ``login_failure_window`` after its last change. One
Lua script checks and counts both at once, on Redis's clock, so the nodes agree
and attempts racing on several nodes are counted one by one.

While Redis is down a password login is refused with ``unavailable``: a
cluster node cannot log anyone in without Redis anyway.
"""

from __future__ import annotations

import hashlib

from bitchat.cluster.registry import REDIS_ERRORS, connect_redis
from bitchat.errors import ServiceUnavailable
from bitchat.im.throttle import LoginThrottle, Rule
from bitchat.settings import Settings

# KEYS: the account's and the address's counts. ARGV: "attempt" or "forgive", the
# window (ms), then free, base (ms), cap (ms) for the account, then for the address.
# "attempt" returns 0 (admitted, counted) or the milliseconds to wait.
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[2])
local function delay(i, n)
  local free = tonumber(ARGV[3 * i])
  local base = tonumber(ARGV[3 * i + 1])
  local cap = tonumber(ARGV[3 * i + 2])
  if n < free or base <= 0 then return 0 end
  local e = n - free
  if e > 60 then e = 60 end
  local d = base * 2 ^ e
  if d > cap then d = cap end
  return math.floor(d)
end
if ARGV[1] == 'attempt' then
  local wait = 0
  for i = 1, 2 do
    local nx = tonumber(redis.call('HGET', KEYS[i], 'next') or '0')
    if nx - now > wait then wait = nx - now end
  end
  if wait > 0 then return wait end
  for i = 1, 2 do
    local n = redis.call('HINCRBY', KEYS[i], 'n', 1)
    redis.call('HSET', KEYS[i], 'next', now + delay(i, n))
    redis.call('PEXPIRE', KEYS[i], window)
  end
  return 0
end
for i = 1, 2 do
  local n = tonumber(redis.call('HGET', KEYS[i], 'n') or '0')
  if n <= 1 then
    redis.call('DEL', KEYS[i])
  else
    redis.call('HSET', KEYS[i], 'n', n - 1, 'next', now + delay(i, n - 1))
  end
end
return 0
"""


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class RedisLoginThrottle(LoginThrottle):
    """Counts of failed logins in Redis (see the module)."""

    def __init__(self, url: str, settings: Settings) -> None:
        super().__init__(settings)
        self.prefix = settings.redis_prefix
        self.redis = connect_redis(url, settings)
        self._script = self.redis.register_script(_SCRIPT)
        self._rules: list[int] = []
        for rule in (self.account_rule, self.address_rule):
            self._rules += _rule_args(rule)

    def keys(self, account: str, address: str) -> list[str]:
        # A digest: an account name is any Unicode, the key stays short and plain.
        digest = hashlib.sha256(account.encode()).hexdigest()[:32]
        return [f"{self.prefix}login:a:{digest}", f"{self.prefix}login:ip:{address}"]

    async def _run(self, op: str, account: str, address: str) -> int:
        try:
            result = await self._script(
                keys=self.keys(account, address), args=[op, _ms(self.window), *self._rules]
            )
        except REDIS_ERRORS as exc:
            raise ServiceUnavailable(f"cannot reach Redis to check the login: {exc}") from exc
        return int(result)

    async def attempt(self, account: str, address: str) -> float:
        if not self.enabled:
            return 0.0
        return await self._run("attempt", account, address) / 1000

    async def forgive(self, account: str, address: str) -> None:
        if self.enabled:
            await self._run("forgive", account, address)

    async def close(self) -> None:
        await self.redis.aclose()


def _rule_args(rule: Rule) -> list[int]:
    return [rule.free, _ms(rule.base), _ms(rule.cap)]
