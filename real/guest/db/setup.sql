-- Run once at build time (mariadbd --bootstrap): the sysbench database and its user.
-- Bootstrap mode starts without the grant tables; loading them makes CREATE USER/GRANT work.
FLUSH PRIVILEGES;
CREATE DATABASE IF NOT EXISTS sbtest;
CREATE USER IF NOT EXISTS 'sbtest'@'%' IDENTIFIED BY 'ftvm-sbtest';
GRANT ALL PRIVILEGES ON sbtest.* TO 'sbtest'@'%';
CREATE DATABASE IF NOT EXISTS ftvm;
GRANT ALL PRIVILEGES ON ftvm.* TO 'sbtest'@'%';
FLUSH PRIVILEGES;
