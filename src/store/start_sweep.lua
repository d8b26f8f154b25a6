-- pgfresh: notes that a sweep of a fragment starts. Sets the sweep's own canary (KEYS[1]) to its
-- token (ARGV[1]) and the version the latest sweep renders (KEYS[3] = v<ARGV[2]>), neither with a
-- TTL (a key with one is what a volatile-* memory policy evicts); deletes the fragment's marker
-- (KEYS[2]) unless it holds the version the sweep renders (ARGV[2]): a marker says every entry holds
-- that version's markup, which stops being true at this sweep's first write, and a sweep that does
-- not finish must not leave it saying so. (The canary of a sweep that never finishes, its process
-- killed, stays: a few bytes.)
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[3], 'v' .. ARGV[2])
local marker = redis.call('GET', KEYS[2])
if marker and marker ~= ARGV[2] then
    redis.call('DEL', KEYS[2])
end
return 0
