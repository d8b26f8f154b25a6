-- pgfresh: ticket-checked writes. KEYS come in pairs (fragment key, its ticket key). ARGV[1] is the
-- render ticket, ARGV[2] how long a deleted key's ticket is kept (ms), ARGV[3] '1' when Redis may
-- evict keys, then one (op, value, ttl) triple per key pair: op 's' sets the fragment to value, with
-- a TTL of ttl ms ('0': none; its ticket then lives ttl + ARGV[2] ms), 'd' deletes it.
-- Returns one result per pair: 0 written, 1 unchanged, 2 refused (a newer render is stored),
-- 3 deleted, 4 already absent, 5 written and 6 deleted without a ticket to check against (Redis may
-- have evicted a newer render's ticket: render the key again), or the error text when Redis refused
-- this key (the others go on).
-- A fragment key holding another type is simply overwritten: it is under pgfresh's prefix.
-- Tickets stay decimal text, compared as such: a Lua number (a double) holds integers exactly only
-- below 2^53, and turns large ones into text like 1.2345678901234e+14.
local ticket = ARGV[1]

-- Whether decimal ticket a (digits, no leading zero) is newer than b.
local function newer(a, b)
    if #a ~= #b then
        return #a > #b
    end
    return a > b
end
local may_evict = ARGV[3] == '1'
local results = {}
for i = 1, #KEYS, 2 do
    local key, ticket_key = KEYS[i], KEYS[i + 1]
    local arg = 3 + (i - 1) / 2 * 3
    local op, value, ttl = ARGV[arg + 1], ARGV[arg + 2], ARGV[arg + 3]
    local stored = redis.pcall('GET', ticket_key)
    local result
    if type(stored) == 'table' and stored.err then
        result = 'error: ' .. stored.err
    elseif stored and newer(stored, ticket) then
        result = 2
    else
        local unchecked = may_evict and not stored
        if op == 'd' then
            local removed = redis.call('DEL', key)
            redis.call('SET', ticket_key, ticket, 'PX', ARGV[2])
            result = removed == 1 and (unchecked and 6 or 3) or 4
        else
            local same = redis.pcall('GET', key) == value
            local set
            if ttl ~= '0' then
                -- SET again, not PEXPIRE: an unchanged entry's TTL is renewed with the commands a
                -- least-privilege ACL already grants.
                set = redis.pcall('SET', key, value, 'PX', ttl)
            elseif not same then
                set = redis.pcall('SET', key, value)
            end
            if type(set) == 'table' and set.err then
                result = 'error: ' .. set.err
            else
                result = same and 1 or 0
            end
            if result == 0 or result == 1 then
                if ttl == '0' then
                    redis.call('SET', ticket_key, ticket)
                else
                    -- The ticket outlives its entry by as long as a deleted key's does, then goes too.
                    redis.call('SET', ticket_key, ticket, 'PX', tonumber(ttl) + tonumber(ARGV[2]))
                end
            end
            if result == 0 and unchecked then
                result = 5
            end
        end
    end
    results[#results + 1] = result
end
return results
