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
--
-- The call reads every ticket and value first, in bulk (one MGET each), then writes every entry
-- and ticket without a TTL with one MSET: a command called from a script costs Redis far more than
-- the work it does, and one per key was most of what a sweep into an empty Redis cost it. The script
-- is atomic, so reading everything before writing anything is the same as going key by key, as long
-- as no key comes twice. What the bulk path cannot answer key by key is done key by key as before:
-- a key twice in one call, a ticket key holding another type (MGET reads it as nil; GET refuses it,
-- and that key is reported as refused), a bulk command Redis refuses (an ACL, memory full).
-- A call carries at most 1,000 pairs (`KEYS_PER_CALL`), so no command here takes more than 4,000
-- arguments: Lua's `unpack` stops short of 8,000.
local ticket = ARGV[1]
local keep_millis = ARGV[2]
local may_evict = ARGV[3] == '1'
local pairs_count = #KEYS / 2

-- Whether decimal ticket a (digits, no leading zero) is newer than b.
local function newer(a, b)
    if #a ~= #b then
        return #a > #b
    end
    return a > b
end

-- Whether Redis refused a command called with pcall.
local function refused(reply)
    return type(reply) == 'table' and reply.err ~= nil
end

-- The op, value and ttl of pair i.
local function write_of(i)
    local arg = 3 + (i - 1) * 3
    return ARGV[arg + 1], ARGV[arg + 2], ARGV[arg + 3]
end

-- Stores the ticket beside an entry just set with this ttl ('0': none).
local function set_ticket(ticket_key, ttl)
    if ttl == '0' then
        redis.call('SET', ticket_key, ticket)
    else
        -- The ticket outlives its entry by as long as a deleted key's does, then goes too.
        redis.call('SET', ticket_key, ticket, 'PX', tonumber(ttl) + tonumber(keep_millis))
    end
end

-- Deletes an entry the ticket allows to delete; unchecked when no ticket was stored.
local function delete(key, ticket_key, unchecked)
    local removed = redis.call('DEL', key)
    redis.call('SET', ticket_key, ticket, 'PX', keep_millis)
    return removed == 1 and (unchecked and 6 or 3) or 4
end

-- Sets an entry the ticket allows to set, knowing whether it already holds the value.
local function set_one(key, ticket_key, value, ttl, same, unchecked)
    local set
    if ttl ~= '0' then
        -- SET again, not PEXPIRE: an unchanged entry's TTL is renewed with the commands a
        -- least-privilege ACL already grants.
        set = redis.pcall('SET', key, value, 'PX', ttl)
    elseif not same then
        set = redis.pcall('SET', key, value)
    end
    if refused(set) then
        return 'error: ' .. set.err
    end
    set_ticket(ticket_key, ttl)
    if same then
        return 1
    end
    return unchecked and 5 or 0
end

-- Pair i, key by key.
local function one(i)
    local key, ticket_key = KEYS[2 * i - 1], KEYS[2 * i]
    local op, value, ttl = write_of(i)
    local stored = redis.pcall('GET', ticket_key)
    if refused(stored) then
        return 'error: ' .. stored.err
    elseif stored and newer(stored, ticket) then
        return 2
    end
    local unchecked = may_evict and not stored
    if op == 'd' then
        return delete(key, ticket_key, unchecked)
    end
    return set_one(key, ticket_key, value, ttl, redis.pcall('GET', key) == value, unchecked)
end

local function key_by_key()
    local results = {}
    for i = 1, pairs_count do
        results[i] = one(i)
    end
    return results
end

if pairs_count == 0 then
    return {}
end

-- Reads: every ticket, and every value to set.
local ticket_keys, set_keys, seen = {}, {}, {}
for i = 1, pairs_count do
    local key = KEYS[2 * i - 1]
    if seen[key] then
        return key_by_key()
    end
    seen[key] = true
    ticket_keys[i] = KEYS[2 * i]
    if write_of(i) == 's' then
        set_keys[#set_keys + 1] = key
    end
end
local stored = redis.pcall('MGET', unpack(ticket_keys))
if refused(stored) then
    return key_by_key()
end
local absent = {}
for i = 1, pairs_count do
    if not stored[i] then
        absent[#absent + 1] = ticket_keys[i]
    end
end
-- MGET reads a key of another type as nil: every nil must be a key that does not exist.
if #absent > 0 then
    local existing = redis.pcall('EXISTS', unpack(absent))
    if refused(existing) or existing ~= 0 then
        return key_by_key()
    end
end
local values = {}
if #set_keys > 0 then
    values = redis.pcall('MGET', unpack(set_keys))
    if refused(values) then
        return key_by_key()
    end
end

-- Writes: deletes and entries with a TTL one by one, the rest in one MSET.
local results, batched, mset = {}, {}, {}
local set_index = 0
for i = 1, pairs_count do
    local key, ticket_key = KEYS[2 * i - 1], ticket_keys[i]
    local op, value, ttl = write_of(i)
    local same
    if op == 's' then
        set_index = set_index + 1
        same = values[set_index] == value
    end
    local unchecked = may_evict and not stored[i]
    if stored[i] and newer(stored[i], ticket) then
        results[i] = 2
    elseif op == 'd' then
        results[i] = delete(key, ticket_key, unchecked)
    elseif ttl ~= '0' then
        results[i] = set_one(key, ticket_key, value, ttl, same, unchecked)
    else
        if not same then
            mset[#mset + 1] = key
            mset[#mset + 1] = value
        end
        mset[#mset + 1] = ticket_key
        mset[#mset + 1] = ticket
        results[i] = same and 1 or (unchecked and 5 or 0)
        batched[#batched + 1] = i
    end
end
if #mset > 0 and refused(redis.pcall('MSET', unpack(mset))) then
    -- Refused as a whole: again key by key, so that each key has its own error.
    for _, i in ipairs(batched) do
        local key, ticket_key = KEYS[2 * i - 1], ticket_keys[i]
        local _, value = write_of(i)
        results[i] = set_one(key, ticket_key, value, '0', results[i] == 1, may_evict and not stored[i])
    end
end
return results
