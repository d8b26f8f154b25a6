-- pgfresh: a sweep confirms entries that already hold exactly its render. KEYS are their ticket keys,
-- ARGV[1] the sweep page's render ticket, then for each key the ticket text the sweep read beside the
-- entry (empty: none). Each ticket still as read is raised to the page's ticket, as the full write
-- would, so that no render older than the page lands later; one that changed since (a write came in
-- between) is left for the full ticket-checked write. Returns per key 1 confirmed, 0 not.
-- Tickets stay decimal text, compared as such (see write.lua).
-- In bulk, as write.lua: one MGET reads the tickets, one MSET raises them. A ticket raised this way
-- loses any TTL it had: the entries a sweep confirms are written without one, and so are their
-- tickets. When Redis refuses the MSET (an ACL without it), the tickets are raised key by key as
-- before, keeping their TTLs. When a ticket key holds another type (MGET reads it as nil) or Redis
-- refuses the reads, nothing is confirmed: those keys take the full write, which reports what is
-- wrong.
local ticket = ARGV[1]
local function newer(a, b)
    if #a ~= #b then
        return #a > #b
    end
    return a > b
end
local function refused(reply)
    return type(reply) == 'table' and reply.err ~= nil
end
local function none()
    local results = {}
    for i = 1, #KEYS do
        results[i] = 0
    end
    return results
end
if #KEYS == 0 then
    return {}
end
local current = redis.pcall('MGET', unpack(KEYS))
if refused(current) then
    return none()
end
local absent = {}
for i = 1, #KEYS do
    if not current[i] then
        absent[#absent + 1] = KEYS[i]
    end
end
if #absent > 0 then
    local existing = redis.pcall('EXISTS', unpack(absent))
    if refused(existing) or existing ~= 0 then
        return none()
    end
end
local results, raised, mset = {}, {}, {}
for i = 1, #KEYS do
    local result = 0
    if (current[i] or '') == ARGV[i + 1] then
        result = 1
        if not (current[i] and (current[i] == ticket or newer(current[i], ticket))) then
            raised[#raised + 1] = i
            mset[#mset + 1] = KEYS[i]
            mset[#mset + 1] = ticket
        end
    end
    results[i] = result
end
if #mset > 0 and refused(redis.pcall('MSET', unpack(mset))) then
    for _, i in ipairs(raised) do
        if refused(redis.pcall('SET', KEYS[i], ticket, 'KEEPTTL')) then
            results[i] = 0
        end
    end
end
return results
