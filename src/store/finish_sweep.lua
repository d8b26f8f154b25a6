-- pgfresh: sets a fragment's marker (KEYS[2] = ARGV[2], its version) only if the sweep's canary
-- (KEYS[1]) still holds the sweep's token (ARGV[1]), so a Redis emptied during the sweep is noticed,
-- and no sweep of another version has started since (KEYS[3], the version of the latest to start):
-- that one may have written its markup over this one's. Sweeps of one version at once each set it.
-- Deletes the canary. Returns 1 when the marker was set.
local set = 0
if redis.call('GET', KEYS[1]) == ARGV[1] and redis.call('GET', KEYS[3]) == 'v' .. ARGV[2] then
    redis.call('SET', KEYS[2], ARGV[2])
    set = 1
end
redis.call('DEL', KEYS[1])
return set
