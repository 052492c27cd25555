// Healthcheck of a MongoDB member of the LionMQ replica set (mongosh --quiet this-file).
// Idempotent: the member that has MONGO_INITIATE=true initiates the set with MONGO_MEMBERS
// (comma-separated host:port, the first one preferred as primary) while it is not initiated;
// rs.initiate needs every listed member up, so it simply fails and runs again at the next
// check until they are. Healthy once this member is PRIMARY or SECONDARY: only then do
// `w: majority` writes and a change of primary work as the nodes expect.
const name = "rs0"; // mongod runs with --replSet rs0; the nodes connect with ?replicaSet=rs0
let status;
try {
  status = rs.status();
} catch (e) {
  if (e.codeName !== "NotYetInitialized") throw e;
  if (process.env.MONGO_INITIATE === "true") {
    const hosts = (process.env.MONGO_MEMBERS || "").split(",").map((h) => h.trim()).filter(Boolean);
    if (hosts.length === 0) throw new Error("MONGO_MEMBERS is empty: list host:port of every member");
    rs.initiate({
      _id: name,
      members: hosts.map((host, i) => ({ _id: i, host, priority: i === 0 ? 2 : 1 })),
    });
  }
  quit(1);
}
const self = status.members.find((m) => m.self);
quit(self && (self.stateStr === "PRIMARY" || self.stateStr === "SECONDARY") ? 0 : 1);
