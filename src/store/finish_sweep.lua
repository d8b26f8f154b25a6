-- pgfresh: sets a fragment's marker (KEYS[2] = ARGV[2], its version) only if the sweep's canary
-- (KEYS[1]) still holds the sweep's token (ARGV[1]), so a Redis emptied during the sweep is noticed;
-- deletes the canary. Returns 1 when the marker was set.
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('SET', KEYS[2], ARGV[2])
    redis.call('DEL', KEYS[1])
    return 1
end
return 0
